"""A project that opens its data the way most training code does: config.yaml's data.path as written,
relative to the directory it runs in (tests/cli/test_trainer_cwd.py). Nothing here knows about harness."""
