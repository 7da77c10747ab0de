"""A trainer that leaves processes behind holding the worker's output pipe (for the local backend's tests).

It starts, each writing its pid to ``$STRAYS_DIR/<name>.pid`` once it runs on its own:

session   a child in a session of its own (``subprocess.Popen(start_new_session=True)``)
daemon    a grandchild in a session of its own whose parent exits at once (``setsid sleep 1000 &``)
scrubbed  a child in a session of its own with an empty environment (found only by the process tree)

Every one inherits the worker's stdout and sleeps for 1000 s. Then the trainer writes its own pid
to ``$STRAYS_DIR/worker.pid`` and, with ``STRAYS_MODE=hang``, hangs; else it trains as
``seed_style`` does and returns.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import seed_style

_SLEEPER = "import os, sys, time; open(sys.argv[1] + '.tmp', 'w').write(str(os.getpid())); " \
           "os.replace(sys.argv[1] + '.tmp', sys.argv[1]); time.sleep(1000)"
_DAEMON = "import os, sys\nif os.fork():\n    os._exit(0)\nos.setsid()\nos.execv(sys.executable, " \
          "[sys.executable, '-c', sys.argv[1], sys.argv[2]])"


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + 60
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def train(cfg, ctx):
    where = Path(os.environ["STRAYS_DIR"])
    names = [n for n in os.environ.get("STRAYS", "session,daemon").split(",") if n]
    for name in names:
        pid_file = str(where / f"{name}.pid")
        if name == "session":
            subprocess.Popen([sys.executable, "-c", _SLEEPER, pid_file], start_new_session=True)
        elif name == "daemon":
            subprocess.Popen([sys.executable, "-c", _DAEMON, _SLEEPER, pid_file]).wait()
        elif name == "scrubbed":
            subprocess.Popen([sys.executable, "-c", _SLEEPER, pid_file], start_new_session=True, env={})
    for name in names:
        _wait_for(where / f"{name}.pid")
    (where / "worker.pid").write_text(str(os.getpid()))
    print("strays: started", ", ".join(names), flush=True)
    if os.environ.get("STRAYS_MODE") == "hang":
        while True:
            time.sleep(3600)
    return seed_style.train(cfg, ctx)
