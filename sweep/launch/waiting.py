"""Trials waiting for resources the cluster does not have (yet): shown, and given up on.

A trial's workers are one placement group (all of its CPUs and GPUs at once), which Ray
keeps pending, without an error, until a node can hold it: on a fixed cluster that is
forever. The local runtime refuses such a trial before it starts
(`runtime.local_resource_problems`); on a cluster the autoscaler may still add the nodes, so
the driver watches instead. Every few seconds it reads Ray's placement-group table for the
groups of its own job (a group's id ends with the job id that created it: the trial
functions and their workers all run in the driver's job) that cannot be placed, shows them
as waiting in the live view and in `sweep status`, and once one has waited
`resources.pending_timeout_s` (0: forever) stops the sweep through `WaitStopper`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import ray
from ray import tune
from ray.util.placement_group import placement_group_table

log = logging.getLogger(__name__)

POLL_S = 2.0
_WATCHES: list[ResourceWatch] = []


def _fmt(amount: float) -> str:
    return f"{amount:g}"


def describe_wait(bundles: list[dict[str, float]], cluster: dict[str, float]) -> str:
    """'waiting for resources: 8 CPU in one placement group; the cluster has 2 CPU, 0 GPU'."""
    need: dict[str, float] = {}
    for bundle in bundles:
        for key, amount in bundle.items():
            if key != "memory" and not key.startswith("bundle_group"):
                need[key] = need.get(key, 0.0) + amount
    wanted = ", ".join(f"{_fmt(v)} {k}" for k, v in sorted(need.items()) if v)
    have = ", ".join(f"{_fmt(cluster.get(k, 0.0))} {k}" for k in ("CPU", "GPU"))
    extra = [f"{_fmt(cluster.get(k, 0.0))} {k}" for k in sorted(need) if k not in ("CPU", "GPU")]
    return (f"waiting for resources: {wanted or 'memory'} in one placement group "
            f"({len(bundles)} bundles); the cluster has {', '.join([have, *extra])}")


def _holds_devices(info: dict) -> bool:
    return any(b.get("CPU", 0) > 0 or b.get("GPU", 0) > 0 for b in info.get("bundles", {}).values())


class ResourceWatch:
    """Polls the placement groups of this driver's job; `line` is what is waiting now,
    `expired` the message once something waited longer than `timeout_s`."""

    def __init__(self, timeout_s: float, on_change: Callable[[str | None], None] | None = None,
                 poll_s: float = POLL_S):
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.on_change = on_change
        self.job = ray.get_runtime_context().get_job_id()
        self.first_seen: dict[str, float] = {}
        self.seen: dict[str, int] = {}  # polls that found each group pending
        self.line: str | None = None
        self.expired: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="resource-watch", daemon=True)

    def __enter__(self) -> ResourceWatch:
        _WATCHES.append(self)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self in _WATCHES:
            _WATCHES.remove(self)
        if self.line is not None and self.on_change is not None:
            self.on_change(None)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check()
            except Exception as err:  # the GCS restarting: try again at the next poll
                log.debug("could not read the placement groups: %s", err)

    def check(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        ours = [(pg_id, info) for pg_id, info in placement_group_table().items() if pg_id.endswith(self.job)]
        pending = {pg_id: info for pg_id, info in ours if info.get("state") == "PENDING"}
        # Queueing behind this sweep's own running trials is no reason to give up: the clock
        # runs only while none of its groups holds CPUs or GPUs (Tune's own groups hold neither).
        queued = any(info.get("state") == "CREATED" and _holds_devices(info) for _, info in ours)
        self.first_seen = {pg_id: now if queued else self.first_seen.get(pg_id, now) for pg_id in pending}
        line = None
        if pending:
            oldest = min(pending, key=self.first_seen.__getitem__)
            bundles = [dict(b) for _, b in sorted(pending[oldest]["bundles"].items())]
            waited = now - self.first_seen[oldest]
            line = describe_wait(bundles, ray.cluster_resources())
            if queued:
                line += ", some held by this sweep's running trials"
            if self.timeout_s and waited >= self.timeout_s and self.expired is None:
                self.expired = (f"{line}: gave up after {waited:.0f}s (resources.pending_timeout_s="
                                f"{self.timeout_s:g}); add nodes, lower resources.workers_per_trial or "
                                "cpus_per_worker/gpus_per_worker, or set pending_timeout_s: 0 to wait for an "
                                "autoscaler")
                log.warning("%s", self.expired)
            # A group is pending for a moment while Ray places it: show it from the second look.
            seen = self.seen.get(oldest, 0) + 1
            line = None if seen < 2 else line if queued else f"{line} (for {waited:.0f}s)"
        self.seen = {pg_id: self.seen.get(pg_id, 0) + 1 for pg_id in pending}
        if (line is None) != (self.line is None) and self.on_change is not None:
            self.on_change(line.split(" (for ")[0] if line else None)
        self.line = line


def waiting_line() -> str | None:
    return next((w.line for w in _WATCHES if w.line), None)


def expired() -> str | None:
    return next((w.expired for w in _WATCHES if w.expired), None)


class WaitStopper(tune.Stopper):
    """Ends the experiment once a watched placement group waited too long. Tune pickles the
    stopper with the experiment, so it keeps no state: the watch of this process decides."""

    def __call__(self, trial_id, result) -> bool:
        return False

    def stop_all(self) -> bool:
        return expired() is not None
