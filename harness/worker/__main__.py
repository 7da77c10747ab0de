import sys

from .preload import await_go, split_await

# A container started ahead of its cell's turn imports first and waits for the go signal (harness.worker.preload).
_wait_s, _argv = split_await(sys.argv[1:])
if _wait_s is not None:
    await_go(_wait_s)

from .retrain import exit_now, main  # noqa: E402 - after the wait: a cold start times its imports as it always did

exit_now(main(_argv))
