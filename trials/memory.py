"""A trial's own peak memory, also on kept workers that run trial after trial.

`torch.cuda.max_memory_allocated` and `ru_maxrss` are process-lifetime maxima: on a kept
worker every trial would report the largest earlier trial's peak. So the CUDA peak is reset
when the trial starts, and on CPU the resident set is sampled by a thread while the trial
runs (Linux `/proc/self/statm`; `ru_maxrss` where that does not exist), from a resident set
with the memory earlier trials freed handed back to the OS.
"""

from __future__ import annotations

import os
import resource
import threading
from typing import Any

SAMPLE_S = 0.01  # 10 ms: far shorter than a forward/backward, so the peak is not missed
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def release_freed_memory() -> None:
    """Hand memory an earlier trial freed back to the OS. glibc keeps freed heap memory in
    its arenas, so without this the resident set a trial starts from (and so its sampled
    peak) still holds the largest earlier trial's tensors."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the peak is then an upper bound


def current_mb(device: Any) -> float:
    """What this process holds now (MiB): CUDA memory allocated, or on CPU the resident set
    after freed memory went back to the OS (so it is what is held, not the allocator's past)."""
    if device.type == "cuda":
        import torch

        return torch.cuda.memory_allocated(device) / 2**20
    release_freed_memory()
    return (rss_bytes() or 0) / 2**20


class PeakMemory:
    """Peak memory of this process from start() to stop(), in MiB."""

    def __init__(self, device: Any):
        self.device = device
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> PeakMemory:
        if self.device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        elif rss_bytes() is not None:
            release_freed_memory()
            self._peak = rss_bytes() or 0
            self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            now = rss_bytes()
            if now is not None and now > self._peak:
                self._peak = now

    def so_far(self) -> float:
        """The peak since start(), without stopping (MiB)."""
        if self.device.type == "cuda":
            import torch

            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self._thread is None:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return max(self._peak, rss_bytes() or 0) / 2**20

    def stop(self) -> float:
        if self.device.type == "cuda":
            import torch

            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self._thread is None:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; lifetime maximum
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, rss_bytes() or 0)
        return self._peak / 2**20
