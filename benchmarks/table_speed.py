"""Table speed: `sweep table` over 1,000 child runs in a real MLflow sqlite store.

Logs one synthetic sweep (a parent run and 1,000 children with the params, tags and final
metrics `sweep run` records; every 20th child FAILED) through MLflow's own client, then
times building the comparison table from the store (lookup, the runs' params and metrics,
aggregation, markdown), median of --repeat runs, against the 3 s target. The `sweep table`
command line is timed too, in a fresh process, so its imports are reported apart.
    python benchmarks/table_speed.py [--runs 1000] [--repeat 3] [--out table_speed.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 3.0
SWEEP = "table-bench"


def log_sweep(uri: str, runs: int) -> tuple[str, float]:
    """The synthetic sweep; returns (parent run id, seconds it took to log)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from sweep.tracking.layout import PARENT_TAG, ROLE_TAG, SWEEP_TAG
    from trials.adapters import FAMILIES

    def no_fsync(dbapi_conn, _record):  # set-up only: the timed reads are unaffected
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA synchronous=OFF")
        cur.close()

    event.listen(Engine, "connect", no_fsync)
    try:
        client = MlflowClient(uri)
        exp = client.create_experiment(SWEEP)
        parent = client.create_run(exp, tags={ROLE_TAG: "sweep", SWEEP_TAG: SWEEP}, run_name=SWEEP).info.run_id
        client.log_batch(parent, params=[Param("metric", "eval_loss"), Param("goal", "minimize")])
        types = list(FAMILIES)
        started = time.perf_counter()
        for i in range(runs):
            adapter = types[i % len(types)]
            lr, seed = (1e-4, 3e-4, 1e-3, 3e-3)[(i // len(types)) % 4], i % 3
            tags = {PARENT_TAG: parent, "adapter.type": adapter, "adapter.variant": adapter, "trial_id": f"t{i:05d}",
                    SWEEP_TAG: SWEEP}
            run_id = client.create_run(exp, tags=tags, run_name=f"t{i:05d}").info.run_id
            ts = int(time.time() * 1000)
            values = {"eval_loss": 1.0 + (i % 97) / 100, "eval_token_accuracy": 0.5 + (i % 13) / 100,
                      "eval_loss_before": 3.0, "s_per_step": 0.1, "tokens_per_s": 900.0 + i % 50,
                      "peak_memory_mb": 700.0, "trainable_params": 1000.0 + i % 8, "total_params": 1e6,
                      "trainable_percent": 0.1 + (i % 8) / 100, "adapter_bytes": 4096.0, "train_s": 3.0, "wall_s": 9.0}
            params = {"adapter.type": adapter, "adapter.r": str(4 * (1 + i % 4)), "trainer.learning_rate": str(lr),
                      "trainer.max_steps": "30", "trainer.batch_size": "8", "seed": str(seed),
                      "model.base_model": "/models/base", "data.train": "/data/train.jsonl",
                      **{f"trainer.k{j}": str(j) for j in range(20)}}
            client.log_batch(run_id, metrics=[Metric(k, v, ts, 30) for k, v in values.items()],
                             params=[Param(k, v) for k, v in params.items()], tags=[RunTag("attempt", "1")])
            client.set_terminated(run_id, "FAILED" if i % 20 == 7 else "FINISHED")
        client.set_terminated(parent, "FINISHED")
        return parent, time.perf_counter() - started
    finally:
        event.remove(Engine, "connect", no_fsync)


def time_table(uri: str) -> tuple[float, int, int]:
    from sweep.results.render import to_markdown
    from sweep.results.table import build_table
    from sweep.tracking.layout import client as make_client
    from sweep.tracking.reader import find_sweep

    started = time.perf_counter()
    client = make_client(uri)
    sweep = find_sweep(client, uri, SWEEP)
    table = build_table(client, sweep)
    text = to_markdown(table)
    took = time.perf_counter() - started
    assert table.counts["trials"] > 0 and text
    return took, table.counts["trials"], len(table.rows)


def time_cli(uri: str) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sweep", "table", SWEEP, "--tracking-uri", uri, "--no-log"],
                          capture_output=True, text=True)
    took = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"sweep table failed:\n{done.stderr}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("table_speed.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        _, logged_s = log_sweep(uri, args.runs)
        builds = [time_table(uri) for _ in range(args.repeat)]
        clis = [time_cli(uri) for _ in range(args.repeat)]
    build_s = statistics.median(b[0] for b in builds)
    cli_s = statistics.median(clis)
    trials, rows = builds[0][1], builds[0][2]
    print(f"{'runs':<34}{trials}")
    print(f"{'rows':<34}{rows}")
    print(f"{'logging them (set-up)':<34}{logged_s:.1f} s")
    print(f"{'table build, median':<34}{build_s:.2f} s  (runs: {', '.join(f'{b[0]:.2f}' for b in builds)})")
    print(f"{'ratio to the 3 s target':<34}{build_s / TARGET_S:.2f}  ({'met' if build_s < TARGET_S else 'missed'})")
    print(f"{'`sweep table` process, median':<34}{cli_s:.2f} s  (imports and start-up included)")
    args.out.write_text(json.dumps({
        "runs": trials, "rows": rows, "log_s": logged_s, "build_s": [b[0] for b in builds], "build_median_s": build_s,
        "cli_s": clis, "cli_median_s": cli_s, "target_s": TARGET_S, "ratio": build_s / TARGET_S,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
