"""The measured window: what the machine did while the measured iterations ran (CPU share, GPU state, energy),
and the record fields and console lines that come of it (`valid`, `validity`, `energy`)."""

from __future__ import annotations

import os
import re
import socket
import sys
import time

import torch

from llmbench.distributed import gather
from llmbench.energy import Energy, EnergyMeter, unavailable
from llmbench.gpu_watch import GpuWatch
from llmbench.profiling import profile_generation
from llmbench.roofline import check_cpu_read_bandwidth
from llmbench.validity import CpuWatch, MemoryFigures, assess, warning_line


def job_processes(world) -> tuple[list[int], list[int], list[int] | None]:
    """(this job's processes on this host, their launchers, the CPUs they may use; None: this process's own).
    With several ranks this is a collective: every rank must call it."""
    if world is None or world.size <= 1:
        return [os.getpid()], [], None
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    ranks = gather(world, (socket.gethostname(), os.getpid(), os.getppid(), affinity))
    here = [r for r in ranks if r[0] == socket.gethostname()]
    cpus = sorted({c for r in here for c in r[3]}) or None
    # The ranks' parents are the launcher's processes on this host (mpiexec's proxy, mpirun, torchrun): they count
    # as the job's own, but not their other children.
    return [r[1] for r in here], sorted({r[2] for r in here} - {r[1] for r in here}), cpus


class MeasuredWindow:
    """start() before the first measured iteration, stop() after the last (or when the run fails). `roofline`: the
    record's (on cpu its measured read bandwidth is what a complete single-process run checks the memory against
    after measurement; a figure set with LLMBENCH_READ_BANDWIDTH_GB_S is not checked)."""

    def __init__(self, device: torch.device, batch_size: int, world=None, roofline: dict | None = None):
        self.device, self.batch_size, self.world = device, batch_size, world
        measured = (roofline or {}).get("source") in ("cache", "measured")
        self.host_gb_s = roofline["read_bandwidth_gb_s"] if measured and device.type == "cpu" and (
            world is None or world.size <= 1) else None
        own, launchers, cpus = job_processes(world)
        self.cpu = CpuWatch(own, launchers, cpus)
        self.gpu = GpuWatch(device, own) if device.type == "cuda" else None
        self.energy = EnergyMeter(device)
        self.started = self.stopped = False
        self.cpu_figures = self.gpu_figures = None
        self.memory_figures: MemoryFigures | None = None
        self.energy_figures: Energy | None = None

    def start(self) -> None:
        self.cpu.start()
        if self.gpu is not None:
            self.gpu.start()
        self.energy.start()
        self.started = True

    def stop(self, generated_tokens: int) -> None:
        if not self.started or self.stopped:
            return
        self.stopped = True
        self.energy_figures = self.energy.stop(generated_tokens * self.batch_size)
        self.cpu_figures = self.cpu.stop()
        if self.gpu is not None:
            self.gpu_figures = self.gpu.stop()

    def record_fields(self, record: dict, complete: bool) -> dict:
        """`valid`, `validity` and `energy` for a record holding `iterations` and `metrics`. With several ranks
        and a complete run this is a collective (GPU energy is summed over the ranks). Called while a failed run
        is being recorded, so it never raises: the iterations must reach the record."""
        try:
            return self._record_fields(record, complete)
        except Exception as exc:  # noqa: BLE001 - see above
            why = f"validity could not be assessed: {type(exc).__name__}: {exc}"
            return {"valid": False, "validity": {"reasons": [why]}, "energy": unavailable(why).to_record()}

    def _record_fields(self, record: dict, complete: bool) -> dict:
        iterations = record["iterations"]
        self.stop(sum(it["generated_tokens"] for it in iterations))
        energy = self.energy_figures or unavailable("the measured iterations did not start")
        if complete and self.world is not None and self.world.size > 1 and self.device.type != "cpu":
            joules = gather(self.world, energy.joules)
            if all(j is not None for j in joules) and energy.window_s:
                energy.joules = sum(joules)
                energy.joules_per_token = energy.joules / energy.generated_tokens if energy.generated_tokens else None
                energy.average_watts = energy.joules / energy.window_s
                energy.scope = f"{energy.scope}, summed over {len(joules)} ranks"
        memory = self.memory_figures if complete else None
        validity = assess(iterations, record["metrics"], record["num_iter"], record["max_new_tokens"],
                          record["num_warmup"], complete, self.cpu_figures, self.gpu_figures, memory)
        return {"valid": validity.valid, "validity": validity.to_record(), "energy": energy.to_record()}

    def check_memory(self) -> None:
        """Right after the measured iterations (before a --profile generation): the memory's read bandwidth now
        against the host's figure (llmbench.roofline.check_cpu_read_bandwidth), for the record's validity; nothing
        where there is no host figure to check against. Ctrl-C during the check ends the check only: the run it
        follows is complete and must reach the record."""
        if not self.host_gb_s:
            return
        try:
            now = check_cpu_read_bandwidth()
        except (KeyboardInterrupt, RuntimeError, MemoryError) as exc:
            why = "interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
            self.memory_figures = MemoryFigures(None, self.host_gb_s, None, None, error=why)
            return
        gb_s = now["read_bandwidth_gb_s"]
        self.memory_figures = MemoryFigures(gb_s, self.host_gb_s, gb_s / self.host_gb_s, now["method"])


def profile_after(backend, inputs, config, device: torch.device, record: dict, world=None) -> tuple[dict, str]:
    """The --profile generation, after the measured ones and outside the measured window (every rank runs it)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{record['model']}-{time.strftime('%Y%m%d-%H%M%S')}")
    rank = world.rank if world is not None and world.size > 1 else None
    profile, table = profile_generation(backend, inputs, config, device, stem, rank)
    return profile.to_record(), table


def print_run_notes(record: dict, profile_table: str | None = None) -> None:
    """Energy on stdout when it was measured, the profile's table and trace; then the one warning line on
    stderr when the run is not valid."""
    energy = record.get("energy") or {}
    if energy.get("joules") is not None:
        per_token = f"{energy['joules_per_token']:.3f} J/token, " if energy["joules_per_token"] is not None else ""
        print(f"Energy: {per_token}{energy['average_watts']:.1f} W average ({energy['source']}: {energy['scope']})")
    if profile_table is not None:
        print(f"Top operators by self time (one extra profiled generation, not in the figures above):\n"
              f"{profile_table}")
        print(f"Profile trace (open it in ui.perfetto.dev or chrome://tracing): {record['profile']['trace_file']}")
    if record.get("valid") is False:
        print(warning_line(record["validity"]["reasons"]), file=sys.stderr, flush=True)
