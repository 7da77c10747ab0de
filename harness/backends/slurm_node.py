"""What a Slurm job runs on its node: the first half of a backend's ``run`` for one cell.

submitit unpickles :func:`run_on_node` in the node's Python (the site's ``python:``) and
calls it. It says where it runs (one ``harness-slurm-node:`` line on the job's output),
then runs the cell exactly as the local backend (a child interpreter whose determinism
variables are set before it starts) or the Docker backend (the cell's image, built or found
in the node's engine) would: fresh cell directory, ``spec.json``, the worker, ``worker.log``.
The worker writes its record into the cell directory (a shared file system); the submitting
host reads it there. Progress events go to the job's output, where the host follows them.

Another runtime (Apptainer, Pyxis) is one more branch of :func:`inner_backend`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import sys
from typing import Any, Mapping

from ..plan import Cell, Job
from ..worker import EVENT_PREFIX
from .base import Backend, Launch

NODE_PREFIX = "harness-slurm-node: "
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURMD_NODENAME", "SLURM_JOB_PARTITION",
               "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES", "SLURM_CPUS_PER_TASK")


def node_facts(env: Mapping[str, str], hostname: str) -> dict[str, Any]:
    """Where the job landed, from the variables Slurm set (pure)."""
    facts: dict[str, Any] = {"hostname": hostname}
    facts.update({k: env[k] for k in _SLURM_VARS if k in env})
    return facts


def inner_backend(runtime: str, python: str | None, cell: Cell, docker: Mapping[str, Any] | None) -> Backend:
    """The backend that runs the cell on this node."""
    if runtime == "docker":
        from ..docker_engine import Engine
        from .docker import DockerBackend

        plans = dict((docker or {}).get("builds") or {})
        # The container gets the GPUs Slurm gave the job, no others.
        gpus = os.environ.get("CUDA_VISIBLE_DEVICES") or "none" if cell.gpu else "none"
        return DockerBackend(Engine.connect(), plans, gpus=gpus, offline=bool((docker or {}).get("offline")),
                             ahead=False, cold_reason="a Slurm job runs one cell: no cell runs before it")
    from .local import LocalBackend

    return LocalBackend(python, cold_reason="a Slurm job runs one cell: a warm server would import torch for it alone")


def _near_time_limit(signum: int, frame: Any) -> None:
    # A site may still send submitit's USR2 (scontrol, an sbatch default): submitit's own handler would
    # end the job as failed before Slurm ends it as TIMEOUT. The worker runs on until the limit.
    print("harness: Slurm signals the job's time limit is near", flush=True)


def _event(event: dict[str, Any]) -> None:
    print(EVENT_PREFIX + json.dumps(event), flush=True)


def run_on_node(runtime: str, python: str | None, cell: Cell, job: Job,
                docker: Mapping[str, Any] | None = None) -> Launch:
    """Run ``cell`` here; returns how its worker ended (its record is in the cell directory)."""
    print(NODE_PREFIX + json.dumps(node_facts(os.environ, socket.gethostname())), flush=True)
    if hasattr(signal, "SIGUSR2"):
        signal.signal(signal.SIGUSR2, _near_time_limit)
    if runtime == "docker" and cell.device == "auto" and cell.image is not None:
        # The container's device is chosen before it starts (a GPU device request): by this node's GPUs.
        from ..images import matrix

        cell = dataclasses.replace(cell, device=matrix.effective_device(cell.image, matrix.detect_host()))
    backend = inner_backend(runtime, python, cell, docker)
    try:
        if runtime == "docker":
            refused = backend.prepare([cell], job).get(cell.name)
            if refused is not None:
                print(f"harness: {refused.error.one_line()}", file=sys.stderr, flush=True)
                raise refused.error
        launched, _, _ = backend.execute(cell, job, _event)
    finally:
        backend.close()
    return launched
