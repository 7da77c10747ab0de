"""A trainer command for the tests: ``python cmd_probe.py MODE``. It does not seed anything itself.

seed     print, as metrics JSON, what the RNGs give at start and what the process sees
events   print two epoch progress lines, then the metrics
fail     write to stderr and exit 3
silent   print a log line and no metrics
"""

import json
import os
import random
import sys

import numpy as np
import torch


def probe():
    site = sys.modules.get("sitecustomize")
    return {
        "torch_initial_seed": torch.initial_seed(),
        "torch_draw": torch.rand(1).item(),
        "random_draw": random.random(),
        "numpy_draw": float(np.random.rand()),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "num_threads": torch.get_num_threads(),
        "hash_randomization": bool(sys.flags.hash_randomization),
        "env": {k: v for k, v in os.environ.items()
                if k.startswith("HARNESS_") or k in ("PYTHONHASHSEED", "CUBLAS_WORKSPACE_CONFIG", "PYTHONPATH")},
        "cwd": os.getcwd(),
        "argv": sys.argv[1:],
        "sys_path": sys.path,
        "sitecustomize": getattr(site, "__file__", None),
        "user_site_ran": os.environ.get("USERPROJ_SITE_RAN"),
    }


def main():
    mode = sys.argv[1]
    if mode == "fail":
        print("loading data", flush=True)
        print("Traceback (most recent call last):\nValueError: the data has 3 columns, expected 4", file=sys.stderr)
        sys.exit(3)
    if mode == "silent":
        print("trained; results are in the usual place")
        return
    if mode == "events":
        for epoch in (1, 2):
            print("HARNESS-EVENT " + json.dumps({"event": "epoch", "epoch": epoch, "epochs": 2, "val_loss": 1.0 / epoch}),
                  flush=True)
    print(json.dumps({"val_loss": 0.5, "r2": 0.9, "extra": probe()}))


if __name__ == "__main__":
    main()
