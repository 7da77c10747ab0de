"""A trainer that writes down how its worker process started (for tests/cli/test_warm.py), then trains as
``seed_style`` does.

``probe.json`` in the cell's directory: the process's session and parent, its cores, its token as
``os.environ`` and ``/proc/self/environ`` (what a forked process inherits) show it, its GPU list,
its working directory, its hash seed, and the first number of every RNG as the worker left them
(seeded) -- the same in a cold and a warm worker, whatever the warm server's own state was.
"""

import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

import seed_style


def train(cfg, ctx):
    with open("/proc/self/environ", "rb") as fh:
        proc_env = dict(kv.split(b"=", 1) for kv in fh.read().split(b"\0") if b"=" in kv)
    facts = {
        "pid": os.getpid(),
        "session_leader": os.getsid(0) == os.getpid(),
        "group_leader": os.getpgid(0) == os.getpid(),
        "ppid": os.getppid(),
        "cpus": sorted(os.sched_getaffinity(0)),
        "token": os.environ.get("HARNESS_CELL_TOKEN"),
        "proc_token": proc_env.get(b"HARNESS_CELL_TOKEN", b"").decode(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "cwd": os.getcwd(),
        "hash_randomization": sys.flags.hash_randomization,
        "hash": hash("harness warm worker"),
        "random": random.random(),
        "numpy": float(np.random.random()),
        "torch": float(torch.rand(1).item()),
        "torch_initial_seed": int(torch.initial_seed()),
        "num_threads": torch.get_num_threads(),
        "cuda_initialized": bool(torch.cuda.is_initialized()),
    }
    Path(ctx.out_dir, "probe.json").write_text(json.dumps(facts))
    return seed_style.train(cfg, ctx)
