"""Driver-side bookkeeping for trials that end without their own cleanup running: their
MLflow runs are closed, their Ray Train placement groups released."""

from __future__ import annotations

import logging
from typing import Any

from ray._raylet import PlacementGroupID
from ray.util.placement_group import (
    PlacementGroup,
    placement_group_table,
    remove_placement_group,
)

from sweep.launch.context import PLACEMENT_GROUP_KEY, LaunchContext
from sweep.launch.progress import trial_error_line
from sweep.tracking import layout, runs

log = logging.getLogger(__name__)


def release_placement_group(pg_hex: str) -> bool:
    """Remove a Train run's placement group if it is still held; True when it was."""
    pg = PlacementGroup(PlacementGroupID(bytes.fromhex(pg_hex)))
    if placement_group_table(pg).get("state") in (None, "REMOVED"):
        return False
    remove_placement_group(pg)
    return True


class Reconciler:
    """Driver-side sink for trials that end without their own cleanup running: a trial
    stopped early by ASHA (Tune ends its actor; the Train controller dies with it) or one
    whose process died.

    - MLflow: closes the trial's child run if still RUNNING (FINISHED + early_stopped tag
      for a stopped trial, FAILED for an errored one).
    - Ray: releases the Train workers' placement group if still held. Train V2 leaves that
      to a detached cleaner actor, whose monitor thread dies on the first transient GCS
      timeout (measured on a loaded 2-core node: the group leaked and the next trial waited
      forever for its CPUs)."""

    def __init__(self, ctx: LaunchContext):
        self.ctx = ctx
        self.client = layout.client(ctx.tracking_uri)
        self.placement_groups: dict[str, str] = {}

    def _open_runs(self, trial: Any):
        children = layout.children(self.client, self.ctx.experiment_id, self.ctx.parent_run_id)
        return [r for r in children if r.data.tags.get(layout.TUNE_TRIAL_TAG) == trial.trial_id
                and r.info.status == "RUNNING"]

    def event(self, kind: str, trial: Any, result: dict | None = None) -> None:
        if kind == "result" and result and result.get(PLACEMENT_GROUP_KEY):
            self.placement_groups[trial.trial_id] = result[PLACEMENT_GROUP_KEY]
        if kind not in ("complete", "error"):
            return
        pg = self.placement_groups.pop(trial.trial_id, None)
        if pg:
            try:
                if release_placement_group(pg):
                    log.info("released the placement group of stopped trial %s", trial)
            except Exception as err:
                log.warning("could not release the placement group of trial %s: %s", trial, err)
        try:
            for run in self._open_runs(trial):
                if kind == "complete":
                    runs.mark_early_stopped(self.client, run.info.run_id)
                else:
                    runs.fail_child(self.client, run.info.run_id, trial_error_line(trial), str(trial.get_error() or ""))
        except Exception as err:  # never let bookkeeping stop the sweep
            log.warning("could not reconcile the MLflow run of trial %s: %s", trial, err)


def close_orphans(ctx: LaunchContext) -> int:
    """After Tune returns no trial is running: close any child still RUNNING."""
    client = layout.client(ctx.tracking_uri)
    children = layout.children(client, ctx.experiment_id, ctx.parent_run_id)
    finished = {r.data.tags.get(layout.TRIAL_ID_TAG) for r in children if r.info.status == "FINISHED"}
    closed = 0
    for run in children:
        if run.info.status != "RUNNING":
            continue
        closed += 1
        if run.data.tags.get(layout.TRIAL_ID_TAG) in finished:
            runs.retire(client, run, "a FINISHED run of the same trial exists")
        else:
            runs.fail_child(client, run.info.run_id, "the trial ended without closing its run (its process died)")
    return closed
