"""Pure logic: no engine, no CLI process (fast; `pytest -m unit`)."""
