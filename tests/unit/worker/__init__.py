"""Tests of harness/worker."""
