"""cpu / cuda / xpu behind one small interface: pick, check, synchronize, measure memory, describe."""

from __future__ import annotations

import resource
from dataclasses import dataclass

import torch

from llmbench.errors import UserError
from llmbench.host import BF16_FLAGS, FP16_FLAGS, CpuKind, cpu_kind

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


@dataclass(frozen=True)
class DtypeChoice:
    dtype: torch.dtype
    reason: str  # why this dtype, as the record states it
    warning: str | None = None  # one line for stderr: an explicit dtype this CPU only emulates


def default_cpu_dtype(cpu: CpuKind) -> tuple[str, str]:
    """-> (dtype name, reason): the fastest precision the CPU computes in natively. bf16 is preferred when the CPU
    has both bf16 and fp16 instructions: the same bytes per weight (so the same memory-bound decode speed), float32's
    range (no overflow in activations), and oneDNN's most tuned 16-bit CPU path."""
    if cpu.native_bf16:
        return "bfloat16", f"default on cpu: {cpu.kind} CPU has native bfloat16 ({_present(cpu, BF16_FLAGS)})"
    if cpu.native_fp16:
        return "float16", (f"default on cpu: {cpu.kind} CPU has native float16 ({_present(cpu, FP16_FLAGS)}) "
                           "and no native bfloat16")
    return "float32", (f"default on cpu: {cpu.kind} CPU has no native bfloat16 or float16 "
                       f"(none of {', '.join(BF16_FLAGS + FP16_FLAGS)})")


def _present(cpu: CpuKind, flags: tuple[str, ...]) -> str:
    return ", ".join(f for f in flags if f in cpu.flags)


def choose_dtype(name: str | None, device: torch.device, cpu: CpuKind | None = None) -> DtypeChoice:
    """The run's dtype and why: the flag, or float16 on GPUs and the CPU's fastest native precision on cpu;
    refuse what a GPU cannot run; an explicit 16-bit dtype that this CPU only emulates comes with a warning."""
    if name is None and device.type == "cpu":
        name, reason = default_cpu_dtype(cpu or cpu_kind())
    elif name is None:
        name, reason = "float16", f"default on {device.type}"
    else:
        reason = f"--dtype {name}"
    dtype = DTYPE_BY_NAME[name]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--dtype bfloat16: {torch.cuda.get_device_name()} has no bfloat16 support; "
                        "use --dtype float16")
    if dtype == torch.bfloat16 and device.type == "xpu" and not torch.xpu.is_bf16_supported():
        raise UserError("--dtype bfloat16: this Intel GPU has no bfloat16 support; use --dtype float16")
    warning = None
    if device.type == "cpu" and reason.startswith("--dtype"):
        cpu = cpu or cpu_kind()
        native, flags = {torch.bfloat16: (cpu.native_bf16, BF16_FLAGS),
                         torch.float16: (cpu.native_fp16, FP16_FLAGS)}.get(dtype, (True, ()))
        if not native:
            best, _ = default_cpu_dtype(cpu)
            warning = (f"warning: --dtype {name}: this CPU ({cpu.model_name}, {cpu.kind}) has no native {name} "
                       f"arithmetic (no {' or '.join(flags)}), so it is emulated; natively it runs {best}")
            reason += f" (emulated on this {cpu.kind} CPU)"
    return DtypeChoice(dtype, reason, warning)


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


def cpu_name() -> str:
    return cpu_kind().model_name


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "xpu":
        return torch.xpu.get_device_name(device)
    return cpu_name()
