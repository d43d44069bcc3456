"""Peak memory of a block of code: allocator peak on CUDA, process peak RSS on Linux CPUs."""

from __future__ import annotations

from pathlib import Path

import torch


def _read_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _read_hwm_kb() -> int | None:
    return _read_status_kb("VmHWM:")


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak_mb`` (None when it cannot be measured).

    On CPU this is the process's peak resident set size (weights included), reset on entry by
    writing 5 to /proc/self/clear_refs; ``kind`` says which measure was used. ``rise_mb`` is the
    peak minus what was resident (CPU) or allocated (CUDA) on entry: the memory the block added.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.peak_mb: float | None = None
        self.start_mb: float | None = None
        self.kind = "cuda_allocated" if self.device.type == "cuda" else "peak_rss"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mb = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            rss = _read_status_kb("VmRSS:")
            self.start_mb = rss / 1024 if rss is not None else None
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.kind = "peak_rss_since_start"  # could not reset: peak over the whole process
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            kb = _read_hwm_kb()
            self.peak_mb = kb / 1024 if kb is not None else None

    @property
    def rise_mb(self) -> float | None:
        if self.peak_mb is None or self.start_mb is None or self.kind == "peak_rss_since_start":
            return None
        return max(self.peak_mb - self.start_mb, 0.0)
