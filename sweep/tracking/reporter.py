"""The rank-0 worker's logger: one trial attempt's metrics and artifacts into its child run."""

from __future__ import annotations

import math
import queue
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from mlflow.entities import Metric, RunTag

from sweep.tracking.layout import ADAPTER_YAML, EARLY_STOP_TAG, TRIAL_ARTIFACTS, client
from sweep.tracking.runs import open_child

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient


def _now_ms() -> int:
    return int(time.time() * 1000)


class _Writer:
    """Rank 0's MLflow writes, in order, on one background thread. Rank 0 writes between
    collectives (after each evaluation); done inline, a slow or retrying tracking server
    would hold every other rank in the next all-reduce until the collective timeout. The
    first failure is kept and raised at `drain`, so no write is lost silently."""

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="mlflow-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    fn, args, kwargs = item
                    fn(*args, **kwargs)
            except BaseException as err:  # noqa: BLE001 (raised in the trial's thread at drain)
                self._error = err
            finally:
                self._queue.task_done()

    def submit(self, fn, *args, **kwargs) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((fn, args, kwargs))

    def drain(self) -> None:
        """Wait until every write is done; raise the first that failed."""
        self._queue.join()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=60)


class MlflowReporter:
    """A trials.metrics.Reporter that logs one trial attempt into its child run; only rank 0
    logs (other ranks get `run=None`). Rank 0 opens the child itself, so the Tune trial
    function never imports MLflow on the way to launching the workers, and closes it as
    FINISHED after uploading the artifacts.

    Per-step metrics are buffered and written with one `log_batch` per evaluation (every
    `eval_every` steps and at the end), so training makes no per-step HTTP calls."""

    def __init__(self, run: dict[str, Any] | None, adapter_block: dict[str, Any],
                 placement: dict[str, str] | None = None, overhead: dict[str, float] | None = None):
        self.adapter_block = adapter_block
        self.placement = placement or {}  # tag -> value: where the trial's processes ran
        self.overhead = overhead or {}  # metric -> seconds spent before the trial's own code
        self._client = None
        self.run_id: str | None = None
        self._buffer: list[Any] = []
        self._logged_at: dict[str, int] = {}
        self._writer: _Writer | None = None
        if run is not None:
            self._client = client(run["tracking_uri"])
            self.run_id = open_child(self._client, run["experiment_id"], run["parent_run_id"], run["sweep"],
                                     run["cfg"], run["variant"], run["tune_trial_id"], run["attempt"])
            self._writer = _Writer()

    def _metric(self, key: str, value: float, step: int):
        value = float(value)
        if math.isnan(value):
            value = float("nan")
        elif math.isinf(value):
            value = math.copysign(1.7976931348623157e308, value)
        self._logged_at[key] = step
        return Metric(key, value, _now_ms(), step)

    def _flush(self, tags: list[Any] = ()) -> None:
        if self._client is None or (not self._buffer and not tags):
            return
        batch, self._buffer = self._buffer, []
        for i in range(0, max(len(batch), 1), 1000):
            self._writer.submit(self._client.log_batch, self.run_id, metrics=batch[i:i + 1000],
                                tags=list(tags) if i == 0 else [])

    def on_setup(self, info: dict[str, Any]) -> None:
        if self._client is None:
            return
        for key in ("trainable_params", "total_params", "trainable_percent", "base_params", "world_size",
                    "train_examples", "eval_examples"):
            if isinstance(info.get(key), (int, float)):
                self._buffer.append(self._metric(key, info[key], 0))
        self._buffer += [self._metric(key, value, 0) for key, value in self.overhead.items()]
        tags = [RunTag("trial.device", str(info.get("device", ""))), RunTag("trial.dtype", str(info.get("dtype", "")))]
        tags += [RunTag(key, value) for key, value in self.placement.items()]
        self._flush(tags)

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if self._client is None:
            return
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self._buffer.append(self._metric(key, value, step))

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        if self._client is None:
            return
        for key, value in metrics.items():
            if key != "step" and isinstance(value, (int, float)):
                self._buffer.append(self._metric(key, value, step))
        self._flush()

    def on_end(self, result: dict[str, Any], out_dir: str) -> None:
        if self._client is None:
            return
        step = int(result.get("step", max(self._logged_at.values(), default=0)))
        for key, value in result.items():
            if key == "step" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if self._logged_at.get(key) == step:
                continue  # the last evaluation already logged this point
            self._buffer.append(self._metric(key, value, step))
        self._flush([RunTag(EARLY_STOP_TAG, "true")] if result.get("early_stopped") else [])
        self._writer.drain()  # every metric is in before the run is closed
        out = Path(out_dir)
        (out / ADAPTER_YAML).write_text(yaml.safe_dump({"adapter": self.adapter_block}, sort_keys=False))
        upload(self._client, self.run_id, out)
        self._client.set_terminated(self.run_id, status="FINISHED")

    def close(self) -> None:
        """Stop the background writer (after on_end, or when the trial failed)."""
        if self._writer is not None:
            self._writer.close()


def upload(c: MlflowClient, run_id: str, out: Path) -> None:
    for name in TRIAL_ARTIFACTS:
        path = out / name
        if path.is_dir():
            c.log_artifacts(run_id, str(path), name)
        elif path.is_file():
            c.log_artifact(run_id, str(path))
