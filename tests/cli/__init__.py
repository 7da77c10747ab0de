"""The harness end to end through its CLI or API, on the local backend (`pytest -m cli`)."""
