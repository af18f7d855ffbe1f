"""Which trial may start now: `resources.max_concurrent_trials`, and budgets
(`budget: {max_trials, max_device_hours, max_wall_hours}`).

Tune limits concurrency only while it creates trials; the trials a resumed experiment
restores are all created already, and Tune, seeing a trial function that needs no CPU,
would start them all at once (measured: every restored trial asked for its workers at
the same moment). So before it starts any worker, each trial function asks the sweep's
ledger (a small actor the driver owns) for a slot, and waits while all are taken; a trial
that ends while another waits lets its kept workers go, so the waiting one can place its own.

The sweep schedules no trial that would cross a budget. The ledger compares the trials started
so far, the device-hours measured on finished trials plus those running trials have held
so far, plus the plan's estimate for this trial, against the limits. A refused trial starts
nothing, records no MLflow run and ends as skipped; running trials finish. The first
refusal is written on the parent run (`layout.STOPPED_TAG`), and `sweep resume NAME
--budget-max-device-hours ...` continues the skipped trials under a larger budget.

Device-hours are a trial's wall time times its workers: each rank holds one device (a GPU,
or a CPU worker) for the whole trial, idle or not.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

NAMESPACE = "peft-sweep"
# How a skipped trial's error reads, so the driver counts it apart from failures.
SKIPPED_PREFIX = "BudgetReached:"
WAIT = "wait"
POLL_S = 1.0


class BudgetReached(Exception):
    """Raised by a trial function the ledger refused; the trial started nothing."""

    def __str__(self) -> str:
        return f"{SKIPPED_PREFIX} {super().__str__()}"


def ledger_name(sweep: str) -> str:
    return f"admission:{sweep}"


@dataclass
class Spent:
    """What the sweep used before this driver started (read back on resume)."""

    trials: int = 0
    device_hours: float = 0.0
    wall_s: float = 0.0


class Ledger:
    def __init__(self, limits: dict[str, float | None], spent: Spent, slots: int):
        self.limits = limits
        self.slots = slots
        self.spent = spent
        self.started = time.time()
        self.running: dict[str, tuple[float, int]] = {}  # tune trial id -> (admitted at, workers)
        self.stopped: str | None = None
        self.waiting: set[str] = set()  # trials asking for a slot while all are taken

    def contended(self) -> bool:
        return bool(self.waiting)

    def _held(self, now: float) -> float:
        return sum((now - at) * workers / 3600 for at, workers in self.running.values())

    def admit(self, key: str, est_device_hours: float, est_wall_hours: float, workers: int) -> str | None:
        """None when the trial may start (and is then counted as running), WAIT while every
        slot is taken, else why it may not start."""
        if key in self.running:
            return None
        if len(self.running) >= self.slots:
            self.waiting.add(key)
            return WAIT
        self.waiting.discard(key)
        now = time.time()
        reason = None
        max_trials = self.limits.get("max_trials")
        started = self.spent.trials + len(self.running)
        if max_trials is not None and started + 1 > max_trials:
            reason = f"budget.max_trials={max_trials:g} reached ({started} trials started)"
        max_dh = self.limits.get("max_device_hours")
        spent, held = self.spent.device_hours, self._held(now)
        if reason is None and max_dh is not None and spent + held + est_device_hours > max_dh:
            reason = (f"budget.max_device_hours={max_dh:g} would be crossed: {spent:.3g} spent + {held:.3g} held by "
                      f"running trials + {est_device_hours:.3g} estimated for the next trial")
        max_wall = self.limits.get("max_wall_hours")
        wall_h = (self.spent.wall_s + now - self.started) / 3600
        if reason is None and max_wall is not None and wall_h + est_wall_hours > max_wall:
            reason = (f"budget.max_wall_hours={max_wall:g} would be crossed: {wall_h:.3g} h elapsed + "
                      f"{est_wall_hours:.3g} h estimated for the next trial")
        if reason is not None:
            self.stopped = self.stopped or reason
            return reason
        self.running[key] = (now, workers)
        return None

    def done(self, key: str, device_hours: float | None = None) -> None:
        """A trial ended: its measured device-hours (or the time it held its workers)."""
        entry = self.running.pop(key, None)
        if entry is None:
            return
        at, workers = entry
        self.spent.trials += 1
        self.spent.device_hours += device_hours if device_hours is not None else (time.time() - at) * workers / 3600

    def report(self) -> dict[str, Any]:
        return {"stopped": self.stopped, "trials": self.spent.trials, "device_hours": self.spent.device_hours,
                "wall_s": self.spent.wall_s + time.time() - self.started}


def start_ledger(sweep: str, limits: dict[str, float | None], spent: Spent, slots: int) -> Any:
    """The sweep's ledger, owned by this driver (it dies with it)."""
    import ray

    return ray.remote(Ledger).options(name=ledger_name(sweep), namespace=NAMESPACE, num_cpus=0,
                                      max_concurrency=1).remote(limits, spent, slots)


def stop_ledger(ledger: Any | None) -> dict[str, Any] | None:
    if ledger is None:
        return None
    import ray

    try:
        return ray.get(ledger.report.remote(), timeout=30)
    finally:
        ray.kill(ledger)


def _ledger(sweep: str) -> Any | None:
    import ray

    try:
        return ray.get_actor(ledger_name(sweep), namespace=NAMESPACE)
    except ValueError:
        return None


class Admission:
    """Held by a trial function for the trial's lifetime: admitted on enter (or BudgetReached),
    its device time booked on exit. Without a ledger (a trial run outside a sweep) it does nothing."""

    def __init__(self, sweep: str | None, key: str, est_device_hours: float, est_wall_hours: float, workers: int,
                 release: Callable[[], None] | None = None):
        self.handle = _ledger(sweep) if sweep else None
        self.release = release
        self.key, self.workers = key, workers
        self.estimate = (est_device_hours, est_wall_hours)
        self.device_hours: float | None = None

    def __enter__(self) -> Admission:
        if self.handle is not None:
            import ray

            while (reason := ray.get(self.handle.admit.remote(self.key, *self.estimate, self.workers))) == WAIT:
                time.sleep(POLL_S)
            if reason is not None:
                raise BudgetReached(reason)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.handle is not None:
            try:
                import ray

                # Another trial function waits for this slot: give it the workers' resources too.
                # A kept gang's placement group outlives its trial actor (Ray scopes groups to
                # the job), so the workers go before the slot is handed on.
                if self.release is not None and ray.get(self.handle.contended.remote(), timeout=60):
                    self.release()
                self.handle.done.remote(self.key, self.device_hours)
            except Exception as err:  # the driver is gone: nothing left to book it on
                log.warning("could not book trial %s on the budget: %s", self.key, err)
