"""fitproj: a small tabular regression project (two process targets from six sensor readings)."""

__version__ = "0.3.1"
