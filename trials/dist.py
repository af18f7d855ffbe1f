"""The process group a trial runs in, and importing DeepSpeed for the right accelerator."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device


def import_deepspeed():
    """DeepSpeed picks its accelerator at import; on a machine without CUDA it would probe
    and warn, so say "cpu" first (unless the caller, e.g. Ray's runtime_env, already did)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import importlib

    import deepspeed

    if deepspeed.get_accelerator().device_name() == "cpu":
        # On CPU, DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce op on first
        # use (~90 s, once per machine). Only inference (AutoTP) all-reduce uses it; training
        # collectives go through torch.distributed, so skip the build.
        # (`import deepspeed.comm.torch as m` would bind the real torch: deepspeed.comm imports it.)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    return deepspeed


def ensure_process_group() -> bool:
    """Join the process group: an existing one (Ray Train creates it), one described by
    torchrun's environment, or a private single-process one. True when this call created it."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    else:
        # An in-process store: no port to pick, nothing to collide with other trials.
        # DeepSpeed insists on LOCAL_RANK even for a single process.
        os.environ.setdefault("LOCAL_RANK", "0")
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def current_world() -> World:
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return World(dist.get_rank(), dist.get_world_size(), local_rank, device)


def all_sum(values: list[float], device: torch.device) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_max(values: list[float], device: torch.device) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


class AgreedFlag:
    """A per-step yes/no that every rank learns together, reduced in the background: the
    answer for one step is read at the next, so no step waits on a collective for it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pending: tuple[int, Any, Any] | None = None

    def post(self, step: int, flag: bool) -> int | None:
        """Start reducing this step's flag; returns the previous posted step if any rank raised it."""
        import torch
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=self.device)
        previous, self.pending = self.pending, (step, dist.all_reduce(t, async_op=True), t)
        return self._resolve(previous)

    def flush(self) -> int | None:
        """Wait for the last posted step; returns it if any rank raised its flag."""
        previous, self.pending = self.pending, None
        return self._resolve(previous)

    @staticmethod
    def _resolve(posted: tuple[int, Any, Any] | None) -> int | None:
        if posted is None:
            return None
        step, work, t = posted
        work.wait()
        return step if t.item() else None


def same_on_all_ranks(values: list[float], device: torch.device, rtol: float = 1e-6) -> bool:
    """Whether every rank holds (nearly) rank 0's values; the same answer on every rank."""
    import torch
    import torch.distributed as dist

    mine = torch.tensor(values, dtype=torch.float64, device=device)
    ref = mine.clone()
    dist.broadcast(ref, src=0)
    differs = 0.0 if torch.allclose(mine, ref, rtol=rtol, atol=0.0) else 1.0
    return all_sum([differs], device)[0] == 0


def broadcast(obj: Any) -> Any:
    """Rank 0's value of `obj`, on every rank."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
