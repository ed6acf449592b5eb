"""Device selection, autocast, out-of-memory retry, peak-memory measurement.

- :func:`select_device` ``"auto"`` picks CUDA, then Apple MPS, then CPU; asking for an unavailable device raises
  :class:`~spine_ldm.errors.DeviceError` (never a silent fallback).
- :func:`autocast` uses bfloat16 on CUDA GPUs that support it (float16 otherwise) and nothing on CPU / MPS. Only the
  networks run under autocast; the sampler's step math stays float32.
- :func:`run_with_oom_retry` runs ``fn(batch)`` and, on CUDA out-of-memory, retries with half the batch until 1.
- Batch size on CPU: all samples of one request run as one batch. A batch of 1 is fine (and used for
  ``samples=1``), but batch-1 3D convolutions hit a slower path in PyTorch's CPU kernels, so two samples cost much
  less than twice one sample.
- :class:`PeakMemory`: CUDA ``max_memory_allocated`` for the run, or on CPU the process's peak resident set size
  (``resource.getrusage``: a process-lifetime maximum, so it includes whatever ran before in the same process).
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Callable, TypeVar

from .errors import DeviceError

T = TypeVar("T")
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def _mps_available(torch) -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def select_device(name: str | Any = "auto"):
    """``torch.device`` for ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``mps``."""
    import torch

    if isinstance(name, torch.device):
        name = str(name)
    s = str(name or "auto").strip().lower()
    if s == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available(torch):
            return torch.device("mps")
        return torch.device("cpu")
    if s == "cpu":
        return torch.device("cpu")
    if s == "cuda" or s.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {s!r} requested but CUDA is not available (torch {torch.__version__}, "
                              f"CUDA build {torch.version.cuda or 'none'}); use --device cpu or auto")
        if ":" in s:
            try:
                idx = int(s.split(":", 1)[1])
            except ValueError:
                raise DeviceError(f"invalid device {name!r}; expected cuda:N") from None
            n = torch.cuda.device_count()
            if not 0 <= idx < n:
                raise DeviceError(f"device {s!r} requested but only {n} CUDA device(s) exist")
        return torch.device(s)
    if s == "mps":
        if not _mps_available(torch):
            raise DeviceError("device 'mps' requested but Apple MPS is not available on this machine; "
                              "use --device cpu or auto")
        return torch.device("mps")
    raise DeviceError(f"unknown device {name!r}; expected one of {', '.join(DEVICE_CHOICES)} (or cuda:N)")


def describe(device) -> str:
    """Human-readable device name, e.g. ``cuda:0 (NVIDIA H100 80GB HBM3)`` or ``cpu (2 threads)``."""
    import torch

    d = torch.device(device)
    if d.type == "cuda":
        idx = d.index if d.index is not None else torch.cuda.current_device()
        return f"cuda:{idx} ({torch.cuda.get_device_name(idx)})"
    if d.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(d)


def autocast_dtype(device):
    import torch

    d = torch.device(device)
    if d.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device, enabled: bool = True):
    """Mixed-precision context for the networks: bf16 (fp16 without bf16 support) on CUDA, none elsewhere."""
    import torch

    dt = autocast_dtype(device) if enabled else None
    if dt is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dt)


def _is_oom(e: BaseException) -> bool:
    import torch

    oom_t = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_t is not None and isinstance(e, oom_t):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower() and "cuda" in str(e).lower()


def run_with_oom_retry(fn: Callable[[int], T], batch: int, device: Any = None) -> T:
    """Call ``fn(batch)``; on CUDA out-of-memory free the cache and retry with ``batch // 2`` (at least 1).

    ``fn`` must process all its work in chunks of at most ``batch`` and be safe to call again from scratch.
    Raises :class:`DeviceError` when even a batch of 1 does not fit.
    """
    import torch

    b = max(1, int(batch))
    while True:
        try:
            return fn(b)
        except Exception as e:  # noqa: BLE001
            if not _is_oom(e):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if b == 1:
                total = ""
                if torch.cuda.is_available():
                    idx = torch.device(device).index if device is not None and torch.device(device).type == "cuda" \
                        else torch.cuda.current_device()
                    total = f" ({torch.cuda.get_device_properties(idx).total_memory / 2**20:.0f} MiB on the GPU)"
                raise DeviceError(f"out of GPU memory even with a batch of 1{total}; use a smaller config, "
                                  f"free the GPU, or run with --device cpu") from None
            b = max(1, b // 2)


def _rss_peak_mb() -> float:
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024.0


class PeakMemory:
    """``with PeakMemory(device) as pm: ...``; then ``pm.mb`` (see module docs for what is measured)."""

    def __init__(self, device):
        import torch

        self.device = torch.device(device)
        self.mb = 0.0
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "process_rss_peak"
        self.t0 = 0.0
        self.seconds = 0.0

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.mb = _rss_peak_mb()
        self.seconds = time.perf_counter() - self.t0
        return False
