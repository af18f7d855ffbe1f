"""What the person running a sweep sees: a live table, or one plain line per trial event.

Ray Tune calls `SweepCallback` on the driver. Tune pickles its callbacks into the
experiment (tuner.pkl) and unpickles them on `sweep resume`, so the callback itself holds
no state: it forwards every event to the sinks attached in *this* process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray.tune import Callback
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from sweep.errors import FAILURE_PREFIXES
from sweep.launch.admission import SKIPPED_PREFIX
from sweep.launch.waiting import waiting_line
from sweep.tracking.reader import rank_key

_SINKS: list[Any] = []


def attach(sink: Any) -> None:
    _SINKS.append(sink)


def detach(sink: Any) -> None:
    if sink in _SINKS:
        _SINKS.remove(sink)


class SweepCallback(Callback):
    """Forwards Tune's trial events to the attached sinks (stateless, survives pickling)."""

    def _emit(self, event: str, trial: Any, result: dict | None = None) -> None:
        for sink in list(_SINKS):
            sink.event(event, trial, result)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._emit("start", trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._emit("result", trial, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._emit("complete", trial)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._emit("recover", trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._emit("error", trial)


@dataclass
class TrialView:
    name: str
    variant: str
    max_steps: int
    state: str = "PENDING"
    step: int = 0
    metric: float | None = None
    trainable: float | None = None
    started: float | None = None
    ended: float | None = None
    error: str | None = None
    note: str = ""

    def elapsed(self, now: float) -> float:
        if self.started is None:
            return 0.0
        return (self.ended or now) - self.started


Describe = Callable[[dict[str, Any]], tuple[str, str, int]]


def trial_error_line(trial: Any) -> str:
    text = None
    try:
        # The driver-local copy is written before the callbacks run; storage syncs later.
        local = trial.error_file
        if local:
            with open(local, errors="replace") as fh:
                text = fh.read()
    except Exception:
        pass
    if not text:
        try:
            text = trial.get_error()
        except Exception:
            pass
    if not text:
        return "failed"
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        if line.startswith(FAILURE_PREFIXES):
            return line.split(":", 1)[1].strip()
    return lines[-1] if lines else "failed"


class Progress:
    """Keeps one TrialView per Tune trial and shows them (rich Live, or plain lines)."""

    def __init__(self, sweep: str, metric: str, goal: str, describe: Describe, *, quiet: bool,
                 console: Console | None = None, expected: int | None = None):
        self.sweep = sweep
        self.metric = metric
        self.goal = goal
        self.describe = describe
        self.quiet = quiet
        self.console = console or Console(stderr=False)
        self.expected = expected
        self.views: dict[str, TrialView] = {}
        self.started = time.time()
        self._live: Live | None = None

    # --- lifecycle
    def __enter__(self) -> Progress:
        attach(self)
        if not self.quiet:
            self._live = Live(self._table(), console=self.console, refresh_per_second=2, transient=False,
                              get_renderable=self._table)
            self._live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        detach(self)
        if self._live is not None:
            self._live.update(self._table(), refresh=True)
            self._live.stop()
            self._live = None

    def print(self, text: str) -> None:
        if self._live is not None:
            self._live.console.print(text, highlight=False, soft_wrap=True)
        else:
            self.console.print(text, highlight=False, soft_wrap=True)

    # --- events
    def view(self, trial: Any) -> TrialView:
        key = trial.trial_id
        if key not in self.views:
            try:
                name, variant, max_steps = self.describe(trial.config)
            except Exception:
                name, variant, max_steps = str(trial), "?", 0
            self.views[key] = TrialView(name, variant, max_steps)
        return self.views[key]

    def event(self, kind: str, trial: Any, result: dict | None = None) -> None:
        v = self.view(trial)
        now = time.time()
        if kind == "start":
            v.state, v.started, v.ended, v.error = "RUNNING", now, None, None
            self._line(f"started  {v.name} ({v.variant})")
        elif kind == "result" and result is not None:
            if v.started is None:
                v.started = now
            v.state = "RUNNING"
            if isinstance(result.get("step"), (int, float)):
                v.step = int(result["step"])
            value = result.get(self.metric)
            if isinstance(value, (int, float)):
                v.metric = float(value)
            if isinstance(result.get("trainable_params"), (int, float)):
                v.trainable = float(result["trainable_params"])
            if result.get("reused"):
                v.note = "reused"
            self._line(f"report   {v.name} step {v.step}/{v.max_steps} {self.metric}={_fmt(v.metric)}")
        elif kind == "complete":
            v.state, v.ended = "TERMINATED", now
            stopped = v.max_steps and v.step and v.step < v.max_steps and v.note != "reused"
            if stopped:
                v.note = "stopped early"
            self._line(f"finished {v.name} {self.metric}={_fmt(v.metric)} in {v.elapsed(now):.1f}s"
                       + (f" ({v.note})" if v.note else ""))
        elif kind == "recover":
            v.state, v.error = "RETRYING", trial_error_line(trial)
            self._line(f"retrying {v.name}: {v.error}")
        elif kind == "error":
            v.state, v.ended, v.error = "ERROR", now, trial_error_line(trial)
            if v.error.startswith(SKIPPED_PREFIX):  # refused by a budget: nothing ran
                v.state, v.error = "SKIPPED", None
                v.note = "budget"
                self._line(f"skipped  {v.name}: {trial_error_line(trial).removeprefix(SKIPPED_PREFIX).strip()}")
            else:
                self._line(f"failed   {v.name}: {v.error}")
        if self._live is not None:
            self._live.update(self._table())

    def _line(self, text: str) -> None:
        if self.quiet:
            stamp = time.strftime("%H:%M:%S")
            print(f"{stamp} [{self.sweep}] {text}", flush=True)

    # --- the live table
    def _table(self) -> Table:
        now = time.time()
        done = sum(v.state in ("TERMINATED", "ERROR", "SKIPPED") for v in self.views.values())
        total = self.expected if self.expected is not None else len(self.views)
        waiting = waiting_line()
        table = Table(title=f"sweep {self.sweep}: {done}/{total} trials done, {now - self.started:.0f}s",
                      title_justify="left", caption=escape(waiting) if waiting else None, caption_justify="left")
        for col in ("trial", "state", "adapter", "step", self.metric, "elapsed"):
            table.add_column(col, justify="right" if col in ("step", self.metric, "elapsed") else "left")
        style = {"RUNNING": "cyan", "TERMINATED": "green", "ERROR": "red", "RETRYING": "yellow", "SKIPPED": "yellow"}
        best = self._best()
        for key, v in self.views.items():
            state = f"[{style.get(v.state, 'white')}]{v.state.lower()}[/]"
            if v.note:
                state += f" ({v.note})"
            metric = _fmt(v.metric) + (" *" if key == best else "")
            table.add_row(escape(v.name), state, escape(v.variant), f"{v.step}/{v.max_steps}", metric,
                          f"{v.elapsed(now):.0f}s")
            if v.error:
                table.add_row("", f"[red]{escape(v.error[:200])}[/]", "", "", "", "")
        return table

    def _best(self) -> str | None:
        """The best trial so far, by the rule the table and export use (on reported values)."""
        scored = [(k, v) for k, v in self.views.items() if v.metric is not None and math.isfinite(v.metric)]
        if not scored:
            return None
        return min(scored, key=lambda kv: rank_key(self.goal, kv[1].metric, kv[1].trainable, kv[1].name))[0]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
