"""The training side: what runs in the process (or container) that retrains one cell.

``python -m harness.worker --spec spec.json`` is the entry point every backend
launches. The modules here need only torch, numpy, pyyaml, joblib and
scikit-learn, because they run inside the minimal images; the host imports
their pure helpers (data digests, launch environment) but never trains.
"""

# A line the worker prints for the launcher (progress, not log): this prefix, then one JSON object.
EVENT_PREFIX = "HARNESS-EVENT "
