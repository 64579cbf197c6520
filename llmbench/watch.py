"""The measured window: what the machine did while the measured iterations ran (CPU share, GPU state, energy),
and the record fields and console lines that come of it (`valid`, `validity`, `energy`)."""

from __future__ import annotations

import os
import re
import socket
import sys
import time

import torch

from llmbench.bandwidth_cache import note_cpu_reading
from llmbench.core_speed import core_share, host_best, measure_core_speed, remember
from llmbench.distributed import gather
from llmbench.energy import Energy, EnergyMeter, unavailable
from llmbench.gpu_watch import GpuWatch
from llmbench.placement import measure_placement
from llmbench.profiling import profile_generation
from llmbench.roofline import check_cpu_read_bandwidth
from llmbench.validity import (
    CoreFigures,
    CpuWatch,
    MemoryFigures,
    PlacementFigures,
    assess,
    warning_line,
)


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
    after measurement; a figure set with LLMBENCH_READ_BANDWIDTH_GB_S is not checked). The cores' speed is checked
    after every complete single-process cpu run."""

    def __init__(self, device: torch.device, batch_size: int, world=None, roofline: dict | None = None):
        self.device, self.batch_size, self.world = device, batch_size, world
        measured = (roofline or {}).get("source") in ("cache", "measured")
        single_cpu = device.type == "cpu" and (world is None or world.size <= 1)
        self.host_gb_s = roofline["read_bandwidth_gb_s"] if measured and single_cpu else None
        self.host_placement_ns = roofline.get("placement_round_trip_ns") if self.host_gb_s else None
        self.checks_cores = single_cpu
        self.placement_before: dict | None = None
        own, launchers, cpus = job_processes(world)
        self.cpu = CpuWatch(own, launchers, cpus)
        self.gpu = GpuWatch(device, own) if device.type == "cuda" else None
        self.energy = EnergyMeter(device)
        self.started = self.stopped = False
        self.cpu_figures = self.gpu_figures = None
        self.memory_figures: MemoryFigures | None = None
        self.core_figures: CoreFigures | None = None
        self.placement_figures: PlacementFigures | None = None
        self.energy_figures: Energy | None = None

    def start(self) -> None:
        if self.checks_cores:  # where the CPUs sit (llmbench.placement: ~20 ms), against where they sit after
            self.placement_before = measure_placement()
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
        memory, cores, placement = (self.memory_figures, self.core_figures, self.placement_figures) if complete \
            else (None, None, None)
        validity = assess(iterations, record["metrics"], record["num_iter"], record["max_new_tokens"],
                          record["num_warmup"], complete, self.cpu_figures, self.gpu_figures, memory, cores, placement)
        return {"valid": validity.valid, "validity": validity.to_record(), "energy": energy.to_record()}

    def check_host(self) -> None:
        """Right after the measured iterations (before a --profile generation), on cpu: where the CPUs sit against
        where they sat before (llmbench.placement), the memory's read bandwidth against the host's figure
        (llmbench.roofline.check_cpu_read_bandwidth; only where there is a measured one), then the cores' speed
        against their best on this host (llmbench.core_speed), for the record's validity.
        Ctrl-C during a check ends the checks only: the run they follow is complete and must reach the record."""
        try:
            if self.checks_cores:
                after = measure_placement()
                self.placement_figures = PlacementFigures(
                    (self.placement_before or {}).get("round_trip_ns"), after.get("round_trip_ns"),
                    self.host_placement_ns, after.get("method"),
                    error=after.get("error") or (self.placement_before or {}).get("error"))
            if self.host_gb_s:
                self._check_memory()
            if self.checks_cores:
                self._check_cores()
        except KeyboardInterrupt:
            why = "interrupted (Ctrl-C)"
            if self.host_gb_s and self.memory_figures is None:
                self.memory_figures = MemoryFigures(None, self.host_gb_s, None, None, error=why)
            if self.checks_cores and self.core_figures is None:
                self.core_figures = CoreFigures(None, None, None, None, None, None, error=why)

    def _check_memory(self) -> None:
        try:
            now = check_cpu_read_bandwidth()
        except (RuntimeError, MemoryError) as exc:
            self.memory_figures = MemoryFigures(None, self.host_gb_s, None, None, error=f"{type(exc).__name__}: {exc}")
            return
        gb_s, before = now["read_bandwidth_gb_s"], None
        placement, ns = self.placement_figures, now["placement_ns"]  # ns: where the CPUs sat for the read
        noted = note_cpu_reading(gb_s, ns, keep=self._quiet())
        raised = self._quiet() and gb_s > self.host_gb_s
        if raised:  # the host's figure was too low: raised, for this record too (an unwritable cache or none: here)
            before, self.host_gb_s = self.host_gb_s, gb_s
        if placement is not None and (raised or placement.host_figure_ns is None):
            placement.host_figure_ns = noted["host_figure_ns"] or (ns if raised else None)
        # the best this placement of the CPUs has read on this host, this check included where it was kept
        best = noted["placement_gb_s"]
        if self._quiet() and ns:
            best = max(best or 0, gb_s)
        self.memory_figures = MemoryFigures(gb_s, self.host_gb_s, gb_s / self.host_gb_s, now["method"],
                                            raised_from_gb_s=before, placement_read_bandwidth_gb_s=best,
                                            placement_share=gb_s / best if best else None,
                                            first_in_placement=bool(best) and noted["placement_gb_s"] is None,
                                            placement_ns=ns)

    def _quiet(self) -> bool:
        """Whether other work left this run's CPUs alone (a figure measured beside others' is never kept)."""
        return self.cpu_figures is not None and self.cpu_figures.quiet()

    def _check_cores(self) -> None:
        try:
            now = measure_core_speed()
        except (RuntimeError, MemoryError) as exc:
            self.core_figures = CoreFigures(None, None, None, None, None, None, error=f"{type(exc).__name__}: {exc}")
            return
        best = host_best(now)
        first = best is None
        if self._quiet():
            try:
                best = remember(now, best)
            except OSError:
                pass  # an unwritable cache: the check still compares with what it has
        best = best or now
        self.core_figures = CoreFigures(now["matmul_gflop_s"], best["matmul_gflop_s"], now["op_us"], best["op_us"],
                                        core_share(now, best), now["method"], first_on_host=first)


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
