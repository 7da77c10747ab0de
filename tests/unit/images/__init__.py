"""Tests of harness/images."""
