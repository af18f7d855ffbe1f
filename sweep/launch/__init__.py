"""Running a planned sweep on Ray. Three kinds of process run this package's code:

- the driver (`sweep run` / `sweep resume`): `driver` (run, resume, outcome), `runtime`
  (Ray start-up, worker environment), `search` (Tune's search space, Optuna, ASHA),
  `progress` (the live view), `reconcile` (closing what a dead trial left), `state` (the
  sweep folder), `submit` and `status`;
- the Tune trial actor, one per concurrent trial: `trial_fn` (one Tune trial: its workers,
  its failure), `gang` (the workers kept between trials), `context` (what it is given);
- the workers, one per DeepSpeed rank: `worker` (runs `trials.train.run_trial`, reports),
  `early_stop` (the scheduler's decision, read after each report).
"""

import os

# Ray Train V2 (the only Train in Ray 2.60) and the plain console output; read when Ray's
# train and tune modules load, so set before any of them is imported.
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
