"""MLflow: the only code that knows how a sweep's runs are laid out.

- `layout`: tag and artifact names, the tracking-URI rule, the client, the reachability check.
- `runs`: writing the parent run and each trial's child run (driver and Tune trial side).
- `reporter`: the rank-0 worker's logger (metrics with steps, artifacts, closing the run).
- `reader`: finding a sweep and its trial runs again; the one rule for the best trial.
"""
