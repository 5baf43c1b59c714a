"""Peak memory of a call.

CUDA: the caching allocator's own counters (reset_peak_memory_stats, then max_memory_allocated).
This counts tensors, not the allocator's reserved-but-free blocks or the CUDA context.

CPU: PyTorch keeps no such counter, so a background thread samples the process resident set
size (RSS) every ~5 ms while the call runs, plus once before and once after. RSS also counts
Python objects and freed-but-not-returned heap, and a spike shorter than the sampling interval
can be missed, so treat the CPU figure as an estimate. Before the baseline is read, freed heap
is handed back to the OS (glibc `malloc_trim`), otherwise memory freed by an earlier measurement
would be reused silently and the delta would read as zero. All figures are MiB (2**20 bytes),
although the keys end in "_mb".
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch

_MIB = 2**20
_INTERVAL_S = 0.005


def _release_freed_heap() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline just includes reusable heap
        pass


def _rss_bytes() -> int:
    import psutil  # a dependency of accelerate; imported late so importing slimtune stays cheap

    return psutil.Process().memory_info().rss


class _RssSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True, name="slimtune-rss-sampler")
        self.peak = _rss_bytes()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(_INTERVAL_S):
            self.peak = max(self.peak, _rss_bytes())

    def stop(self) -> int:
        self._done.set()
        self.join()
        self.peak = max(self.peak, _rss_bytes())
        return self.peak


@contextlib.contextmanager
def track_peak_memory(device: torch.device | str = "cpu") -> Iterator[dict]:
    """Context manager; the yielded dict is filled with the peak-memory report on exit."""
    device = torch.device(device)
    stats: dict = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        try:
            yield stats
        finally:
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
            stats.update(
                device=str(device),
                peak_allocated_mb=peak / _MIB,
                baseline_allocated_mb=baseline / _MIB,
                peak_delta_mb=(peak - baseline) / _MIB,
            )
        return
    _release_freed_heap()
    baseline = _rss_bytes()
    sampler = _RssSampler()
    sampler.start()
    try:
        yield stats
    finally:
        peak = sampler.stop()
        stats.update(
            device="cpu",
            peak_rss_mb=peak / _MIB,
            baseline_rss_mb=baseline / _MIB,
            peak_delta_mb=(peak - baseline) / _MIB,
        )


def peak_memory(fn: Callable, *args, **kwargs) -> tuple[object, dict]:
    """Run fn(*args, **kwargs); return (its result, peak-memory report).

    Measures CUDA when CUDA is initialised in this process (something already lives there),
    else CPU RSS; see the module docstring for the method. To pick the device explicitly use
    `with track_peak_memory(device) as stats:`.
    """
    use_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    with track_peak_memory(device) as stats:
        result = fn(*args, **kwargs)
    return result, stats
