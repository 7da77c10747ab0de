"""harness: rerun a tuned training run (an ``optuna_best/`` directory) under a
CUDA/PyTorch/hardware matrix and judge whether it reproduces.

Importing this package imports nothing heavy: the worker side (which runs
inside minimal images) needs only torch, numpy, pyyaml, joblib, scikit-learn.
"""

__version__ = "0.2.0"
