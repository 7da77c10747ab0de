"""Tests that need a Docker engine, a Slurm cluster or a browser (`pytest -m engine`)."""
