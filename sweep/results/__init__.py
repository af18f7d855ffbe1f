"""Read-only outputs of a finished (or running) sweep, built from its MLflow runs.

- `table`: one row per adapter variant, its best configuration over seeds; `render`: as
  markdown, CSV, HTML, JSON; `plots`: curves and the Pareto chart; `peft_mc`: HF PEFT's
  method_comparison JSON; `export`: the best trial as a Ludwig YAML + PEFT adapter;
  `ui`: the MLflow dashboard on the sweep's store.
"""
