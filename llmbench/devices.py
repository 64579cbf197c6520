"""cpu / cuda / xpu behind one small interface: pick, check, synchronize, measure memory, describe."""

from __future__ import annotations

import platform
import resource
from functools import cache

import torch

from llmbench.errors import UserError

DTYPE_BY_NAME = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _xpu_available() -> bool:
    return hasattr(torch, "xpu") and torch.xpu.is_available()


def resolve_device(name: str) -> torch.device:
    """'auto' -> xpu, then cuda, then cpu; a named device must be present."""
    if name == "auto":
        if _xpu_available():
            return torch.device("xpu")
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to this torch "
                        f"(torch {torch.__version__}); use --device cpu or install a CUDA build of torch")
    if name == "xpu" and not _xpu_available():
        raise UserError("--device xpu: no Intel GPU is visible to this torch "
                        f"(torch {torch.__version__}); use --device cpu or install an XPU build of torch")
    return torch.device(name)


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The run's dtype: the flag, or float16 on GPUs and bfloat16 on cpu; refuse what the device cannot run."""
    if name is None:
        name = "bfloat16" if device.type == "cpu" else "float16"
    dtype = DTYPE_BY_NAME[name]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--dtype bfloat16: {torch.cuda.get_device_name()} has no bfloat16 support; "
                        "use --dtype float16")
    if dtype == torch.bfloat16 and device.type == "xpu" and not torch.xpu.is_bf16_supported():
        raise UserError("--dtype bfloat16: this Intel GPU has no bfloat16 support; use --dtype float16")
    return dtype


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a timestamp taken next covers them (no-op on cpu)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xpu":
        torch.xpu.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "xpu":
        torch.xpu.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak device memory allocated by torch since the last reset; on cpu, the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type == "xpu":
        return int(torch.xpu.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def peak_memory_kind(device: torch.device) -> str:
    return "process peak RSS" if device.type == "cpu" else f"{device.type} max allocated"


@cache
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "xpu":
        return torch.xpu.get_device_name(device)
    return cpu_name()
