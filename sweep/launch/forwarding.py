"""Environment variables the user asks to forward (`--forward-env NAME`), off the record.

Ray's runtime env is logged (`runtime_env_agent.log`, served by the dashboard) and the trial
context is pickled into Tune's experiment state (the `--storage` folder, a bucket on a
cluster), so neither may carry a credential. Instead the driver puts the values into a
small named actor, through a method call (Ray passes call arguments to the actor and keeps
them in no log or state file), and every worker reads them from it before its trial starts.
What stays visible is the worker processes' own environment, as with any process.

The actor lives as long as the driver; `sweep resume` starts a new one with the values of
the same names from the resuming shell.
"""

from __future__ import annotations

import os
from typing import Any

import ray

from sweep.errors import LaunchError

NAMESPACE = "peft-sweep"


def box_name(sweep: str) -> str:
    return f"forwarded-env:{sweep}"


class EnvBox:
    """Holds the forwarded values for the sweep's workers."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def put(self, values: dict[str, str]) -> None:
        self.values = dict(values)

    def get(self) -> dict[str, str]:
        return dict(self.values)


def missing(names: list[str]) -> list[str]:
    return [n for n in names if n not in os.environ]


def values_of(names: list[str], extra: dict[str, str] | None = None) -> dict[str, str]:
    """The values to forward: the named variables of this shell (all must be set), plus
    `extra` (credentials taken out of the tracking URI)."""
    absent = missing(names)
    if absent:
        raise LaunchError([f"--forward-env {n}: not set in this shell; set it, or drop the flag" for n in absent])
    return {**{n: os.environ[n] for n in names}, **(extra or {})}


def start_box(sweep: str, values: dict[str, str]) -> Any | None:
    """The sweep's box, holding `values`; None when there is nothing to forward."""
    if not values:
        return None
    box = ray.remote(EnvBox).options(name=box_name(sweep), namespace=NAMESPACE, num_cpus=0,
                                     get_if_exists=True).remote()
    ray.get(box.put.remote(values))
    return box


def stop_box(box: Any | None) -> None:
    if box is not None:
        ray.kill(box)


def receive(sweep: str) -> list[str]:
    """In a worker: put the forwarded values into this process's environment; their names."""
    try:
        box = ray.get_actor(box_name(sweep), namespace=NAMESPACE)
    except ValueError:
        raise RuntimeError(f"the driver of sweep {sweep} holds no forwarded environment (it has stopped)") from None
    values = ray.get(box.get.remote(), timeout=120)
    os.environ.update(values)
    return sorted(values)
