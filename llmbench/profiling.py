"""`--profile DIR`: a torch.profiler trace of one extra generation after the measured ones (never part of the
figures), written as Chrome/Perfetto JSON, with a table of the top operators by self time."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llmbench.devices import synchronize
from llmbench.errors import UserError
from llmbench.timing import StepTimer

TOP_OPERATORS = 20


@dataclass
class Profile:
    """Record key `profile`: where the trace and the table are, and the top operators."""

    trace_file: str
    table_file: str
    sorted_by: str
    generation_s: float  # wall time of the profiled generation, profiler overhead included
    top_operators: list[dict]  # name, self time (s), calls; the first few of the table

    def to_record(self) -> dict:
        return asdict(self)


def check_folder(folder: Path) -> None:
    """A --profile folder must be one (or creatable): checked before the model loads."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--profile {folder}: this is a file, not a folder for the trace")


def activities_for(device: torch.device) -> tuple[list, str]:
    """The profiler's activities for the device, and the self-time column to sort the table by."""
    from torch.profiler import ProfilerActivity

    if device.type == "cuda":
        return [ProfilerActivity.CPU, ProfilerActivity.CUDA], "self_device_time_total"
    if device.type == "xpu":
        if not hasattr(ProfilerActivity, "XPU"):
            raise UserError(f"--profile on xpu needs a torch with XPU profiling (this is {torch.__version__})")
        return [ProfilerActivity.CPU, ProfilerActivity.XPU], "self_device_time_total"
    return [ProfilerActivity.CPU], "self_cpu_time_total"


def profile_generation(backend, inputs, config, device: torch.device, stem: str, rank: int | None = None) -> tuple[
        Profile, str]:
    """Profile one generation like the measured ones; -> (record entry, the table as text)."""
    from torch.profiler import profile

    folder = Path(config.profile)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--profile {folder}: cannot create the folder: {exc.strerror}") from None
    suffix = f"-rank{rank}" if rank is not None else ""
    trace, table_file = folder / f"{stem}{suffix}.trace.json", folder / f"{stem}{suffix}.top-operators.txt"
    activities, sort_by = activities_for(device)
    timer = StepTimer(device, per_token=config.token_latency)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        backend.generate(inputs, config.max_new_tokens, config.num_beams, timer if config.token_latency else None)
        synchronize(device)
        generation_s = time.perf_counter() - start
    prof.export_chrome_trace(str(trace))
    averages = prof.key_averages()
    table = averages.table(sort_by=sort_by, row_limit=TOP_OPERATORS)
    table_file.write_text(table + "\n", encoding="utf-8")
    top = sorted(averages, key=lambda e: getattr(e, sort_by), reverse=True)[:10]
    operators = [{"name": e.key, "self_time_s": getattr(e, sort_by) / 1e6, "calls": e.count} for e in top]
    return Profile(str(trace.resolve()), str(table_file.resolve()), sort_by, generation_s, operators), table
