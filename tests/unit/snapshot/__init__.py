"""Tests of harness/snapshot."""
