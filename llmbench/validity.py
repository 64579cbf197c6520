"""Can a run's figures be trusted? What else the machine did while the measured iterations ran, and the verdict.

CpuWatch reads the CPUs' busy time (/proc/stat) and this job's own CPU time (psutil) at the start and the end of
the measured iterations: the difference is what other processes took (llmbench.gpu_watch does the same for a GPU).
`assess` turns those figures, the latencies' spread and the run's own facts (tokens, warm-up, completeness) into
`valid` and the reasons against it. Thresholds: docs/validity.md.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from llmbench.gpu_watch import GPU_SLOWDOWN_REASONS, GpuFigures
from llmbench.placement import moved

# Thresholds (docs/validity.md says why these values).
MAX_OTHER_CPU_SHARE = 0.25  # quiet 2-core runs show a few %; two busy loops beside a 2-thread decode ~50%
MAX_STEAL_SHARE = 0.25  # CPU time the hypervisor gave to other virtual machines
MAX_NEXT_TOKEN_CV = 1.0  # quiet CPUs: 5-20%; a disturbed 2-thread decode: well above 100%
MIN_NEXT_TOKEN_STEPS = 8
MAX_E2E_CV = 0.5  # the iterations repeat the same work: a quiet run varies by a few %
MIN_E2E_ITERATIONS = 3
MAX_OTHER_GPU_SM_PERCENT = 10.0  # other processes' mean SM utilization on the device
MAX_GPU_THERMAL_SHARE = 0.10  # share of the window the GPU spent clocked down for heat
MIN_MEMORY_BANDWIDTH_SHARE = 0.8  # cpu: read bandwidth right after measurement / the host's best figure
MIN_CORE_SPEED_SHARE = 0.8  # cpu: the cores' speed right after measurement / their best on this host

PROC_STAT = Path("/proc/stat")
SYS_CPU = Path("/sys/devices/system/cpu")


def clock_ticks_per_s() -> int:
    try:
        return os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError, AttributeError):
        return 100


def read_cpu_times(cpus: list[int], stat_text: str | None = None) -> dict[str, float] | None:
    """Seconds of busy, steal and total time summed over `cpus` (cpuN lines of /proc/stat); None where absent."""
    if stat_text is None:
        try:
            stat_text = PROC_STAT.read_text()
        except OSError:
            return None
    wanted, hz = set(cpus), clock_ticks_per_s()
    busy = steal = total = 0.0
    seen = 0
    for line in stat_text.splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in wanted:
            continue
        # user nice system idle iowait irq softirq steal [guest guest_nice: already inside user and nice]
        user, nice, system, idle, iowait, irq, softirq, stolen = (int(v) for v in (fields + ["0"] * 8)[:8])
        busy += user + nice + system + irq + softirq
        steal += stolen
        total += user + nice + system + idle + iowait + irq + softirq + stolen
        seen += 1
    if not seen:
        return None
    return {"busy_s": busy / hz, "steal_s": steal / hz, "total_s": total / hz}


def tree_cpu_s(roots: list[int], lone: list[int] = ()) -> float:
    """CPU seconds (user + system) used so far by the processes `roots`, their live descendants and the children
    they have reaped, plus the processes `lone` alone. A process that is gone counts nothing."""
    total, seen = 0.0, set()

    def add(proc: psutil.Process, reaped: bool) -> None:
        nonlocal total
        if proc.pid in seen:
            return
        seen.add(proc.pid)
        t = proc.cpu_times()
        total += t.user + t.system + ((t.children_user + t.children_system) if reaped else 0.0)

    for pid in roots:
        try:
            root = psutil.Process(pid)
            add(root, True)
            for child in root.children(recursive=True):
                try:
                    add(child, True)
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
    for pid in lone:
        try:
            add(psutil.Process(pid), False)
        except psutil.Error:
            pass
    return total


def read_frequencies_mhz(cpus: list[int]) -> tuple[float | None, str | None]:
    """Mean current clock of `cpus` (cpufreq, else /proc/cpuinfo's 'cpu MHz'), and where it was read."""
    values = []
    for cpu in cpus:
        try:
            values.append(int((SYS_CPU / f"cpu{cpu}/cpufreq/scaling_cur_freq").read_text()) / 1000)
        except (OSError, ValueError):
            break
    if values and len(values) == len(cpus):
        return sum(values) / len(values), "cpufreq"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, None
    wanted, cpu, values = set(cpus), None, []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "processor":
            cpu = int(value)
        elif key == "cpu MHz" and cpu in wanted:
            values.append(float(value))
    return (sum(values) / len(values), "/proc/cpuinfo") if values else (None, None)


def read_throttle_count(cpus: list[int]) -> int | None:
    """Thermal throttling events so far on `cpus` (Intel's thermal_throttle counters); None where not exposed."""
    total, found = 0, False
    for cpu in cpus:
        for name in ("core_throttle_count", "package_throttle_count"):
            try:
                total += int((SYS_CPU / f"cpu{cpu}/thermal_throttle/{name}").read_text())
                found = True
            except (OSError, ValueError):
                pass
    return total if found else None


@dataclass
class CpuFigures:
    """What the watched CPUs did during the measured iterations (shares are of window_s x cpus)."""

    cpus: list[int]
    window_s: float
    other_share: float | None  # other processes' busy time
    other_share_resolution: float | None  # +/- from the counters' tick resolution
    own_share: float | None  # this job's processes
    steal_share: float | None
    own_pids: list[int]
    load_average_before: list[float] | None  # 1, 5, 15 minutes
    load_average_after: list[float] | None
    frequency_mhz_before: float | None
    frequency_mhz_after: float | None
    frequency_source: str | None
    throttle_events: int | None
    unreadable: str | None = None  # why the CPU share could not be measured

    def quiet(self) -> bool:
        """Whether other work left these CPUs alone: others' processes and the hypervisor's steal within their
        limits (a figure measured beside others' work is never kept as the host's)."""
        return self.other_share is not None and self.other_share <= MAX_OTHER_CPU_SHARE and (
            self.steal_share or 0.0) <= MAX_STEAL_SHARE


@dataclass
class MemoryFigures:
    """cpu: the read bandwidth measured right after the measured iterations against the host's best figure (the one
    the roofline divides by), and against the best read with the CPUs placed as now (llmbench.placement: a
    hypervisor may place a guest's CPUs where they reach less of the memory). Other virtual machines on the same
    host take memory bandwidth without showing in any CPU counter of this one (steal included), and a decode step
    slows down as much as the bandwidth it loses."""

    read_bandwidth_gb_s: float | None
    host_read_bandwidth_gb_s: float
    share: float | None  # read_bandwidth_gb_s / host_read_bandwidth_gb_s
    method: str | None
    error: str | None = None  # why the check could not run
    raised_from_gb_s: float | None = None  # the host's figure before this check read more (the roofline now uses it)
    placement_read_bandwidth_gb_s: float | None = None  # the best read in this placement of the CPUs on this host
    placement_share: float | None = None  # read_bandwidth_gb_s / placement_read_bandwidth_gb_s
    first_in_placement: bool = False  # no earlier read in this placement: this check's is its best so far
    placement_ns: float | None = None  # where the CPUs sat for this read (None: they moved during it, or unknown)


@dataclass
class PlacementFigures:
    """cpu: how this machine's CPUs sat relative to each other (llmbench.placement: the slowest round trip of a cache
    line between two of them) before and after the measured iterations, and when the host's read-bandwidth figure was
    measured. A hypervisor that moves them changes the memory bandwidth they reach and every hand-over between
    threads, without showing in any CPU counter of this machine."""

    before_ns: float | None
    after_ns: float | None
    host_figure_ns: float | None  # when the host's bandwidth figure was measured (None: not recorded then)
    method: str | None
    error: str | None = None  # why it could not be measured

    def moved_during(self) -> bool:
        return moved(self.before_ns, self.after_ns)

    def differs_from_host_figure(self) -> bool:
        return moved(self.after_ns, self.host_figure_ns)


@dataclass
class CoreFigures:
    """cpu: the cores' speed measured right after the measured iterations against the best this host has given
    (llmbench.core_speed): a matrix product's GFLOP/s and one small operator's time. Busy hyperthread siblings
    (another virtual machine's) or a lowered clock slow the cores without showing in any CPU counter of this one."""

    matmul_gflop_s: float | None
    host_matmul_gflop_s: float | None
    op_us: float | None
    host_op_us: float | None
    share: float | None  # the slower probe's speed now / its best on this host
    method: str | None
    first_on_host: bool = False  # no earlier figure: this run's own is the host's best so far
    error: str | None = None  # why the check could not run


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


class CpuWatch:
    """CPU time of the watched CPUs and of this job's processes between start() and stop().

    `own_pids`: the job's processes whose trees count as its own (default: this process); `lone_pids`: processes
    counted without their trees (a launcher); `cpus`: the CPUs the job may run on (default: this affinity)."""

    def __init__(self, own_pids: list[int] | None = None, lone_pids: list[int] | None = None,
                 cpus: list[int] | None = None):
        self.own_pids = own_pids or [os.getpid()]
        self.lone_pids = lone_pids or []
        if cpus is None:
            cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(
                range(os.cpu_count() or 1))
        self.cpus = cpus
        self._start: tuple | None = None

    def _sample(self) -> tuple:
        return (time.perf_counter(), read_cpu_times(self.cpus), tree_cpu_s(self.own_pids, self.lone_pids),
                read_throttle_count(self.cpus))

    def start(self) -> None:
        self._load_before = _load_average()
        self._freq_before, self._freq_source = read_frequencies_mhz(self.cpus)
        self._start = self._sample()

    def stop(self) -> CpuFigures:
        wall, times, own, throttle = self._sample()
        wall0, times0, own0, throttle0 = self._start
        freq_after, _ = read_frequencies_mhz(self.cpus)
        window_s = wall - wall0
        capacity_s = window_s * len(self.cpus)
        figures = CpuFigures(
            cpus=self.cpus, window_s=window_s, other_share=None, other_share_resolution=None, own_share=None,
            steal_share=None, own_pids=self.own_pids, load_average_before=self._load_before,
            load_average_after=_load_average(), frequency_mhz_before=self._freq_before,
            frequency_mhz_after=freq_after, frequency_source=self._freq_source,
            throttle_events=throttle - throttle0 if throttle is not None and throttle0 is not None else None)
        if times is None or times0 is None or capacity_s <= 0:
            figures.unreadable = "no /proc/stat (not Linux?): the CPU share of other processes is unknown"
            return figures
        own_s = own - own0
        figures.own_share = own_s / capacity_s
        # a share of the window's capacity: the counters' ticks can put a short window's difference outside [0, 1]
        figures.other_share = min(1.0, max(0.0, (times["busy_s"] - times0["busy_s"] - own_s) / capacity_s))
        figures.steal_share = (times["steal_s"] - times0["steal_s"]) / capacity_s
        # Each counter delta is exact only to one tick: the CPUs' busy sums and the job's user + system times.
        ticks = 2 * len(self.cpus) + 2 * (len(self.own_pids) + len(self.lone_pids))
        figures.other_share_resolution = ticks / clock_ticks_per_s() / capacity_s
        return figures


# NVML clock-event reason bits (nvml.h: nvmlClocksEventReason*), and those that mean the GPU was held back.
@dataclass
class Validity:
    """The verdict on one benchmark run and the figures behind it (record keys `valid` and `validity`)."""

    valid: bool
    reasons: list[str]
    complete: bool
    iterations_measured: int
    iterations_requested: int
    warmup_iterations: int
    tokens_as_requested: bool
    next_token_latency_cv: float | None
    e2e_latency_cv: float | None
    cpu: CpuFigures | None
    gpu: GpuFigures | None
    thresholds: dict
    memory: MemoryFigures | None = None
    cores: CoreFigures | None = None
    placement: PlacementFigures | None = None

    def to_record(self) -> dict:
        out = asdict(self)
        out.pop("valid")
        return out


THRESHOLDS = {"max_other_cpu_share": MAX_OTHER_CPU_SHARE, "max_steal_share": MAX_STEAL_SHARE,
              "max_next_token_cv": MAX_NEXT_TOKEN_CV, "min_next_token_steps": MIN_NEXT_TOKEN_STEPS,
              "max_e2e_cv": MAX_E2E_CV, "min_e2e_iterations": MIN_E2E_ITERATIONS,
              "max_other_gpu_sm_percent": MAX_OTHER_GPU_SM_PERCENT, "max_gpu_thermal_share": MAX_GPU_THERMAL_SHARE,
              "min_memory_bandwidth_share": MIN_MEMORY_BANDWIDTH_SHARE, "min_core_speed_share": MIN_CORE_SPEED_SHARE}


def assess(iterations: list[dict], metrics: dict, requested_iterations: int, requested_tokens: int,
           warmup_iterations: int, complete: bool, cpu: CpuFigures | None = None,
           gpu: GpuFigures | None = None, memory: MemoryFigures | None = None,
           cores: CoreFigures | None = None, placement: PlacementFigures | None = None) -> Validity:
    """The verdict: `iterations` are the record's (generated_tokens, token_latencies_s), `metrics` its metrics."""
    reasons = []
    if cpu is not None and cpu.other_share is not None:
        # Only a share above the threshold by more than the counters' resolution counts (short windows are coarse).
        if cpu.other_share - (cpu.other_share_resolution or 0.0) > MAX_OTHER_CPU_SHARE:
            reasons.append(f"other processes used {cpu.other_share:.0%} of the CPUs during measurement")
        if (cpu.steal_share or 0.0) - (cpu.other_share_resolution or 0.0) > MAX_STEAL_SHARE:
            reasons.append(f"the hypervisor gave {cpu.steal_share:.0%} of this machine's CPU time to others "
                           "during measurement (steal)")
    if placement is not None and placement.moved_during():
        reasons.append(f"the hypervisor moved this machine's CPUs during measurement (a cache line's round trip "
                       f"between two of them took {placement.before_ns:.0f} ns before, {placement.after_ns:.0f} ns "
                       "after): the figures mix two placements, whose memory bandwidth and thread hand-overs differ")
    elsewhere = placement is not None and placement.differs_from_host_figure()
    if memory is not None and memory.share is not None and memory.share < MIN_MEMORY_BANDWIDTH_SHARE and not (
            elsewhere and (memory.placement_share or 0.0) >= MIN_MEMORY_BANDWIDTH_SHARE):
        # where the CPUs sit otherwise than when the host's figure was read, the figure to reach is their placement's
        if elsewhere and memory.placement_share is not None:
            reasons.append(f"right after measurement a read of memory reached {memory.read_bandwidth_gb_s:.1f} GB/s, "
                           f"{memory.placement_share:.0%} of the {memory.placement_read_bandwidth_gb_s:.1f} GB/s "
                           f"this host reads at best with its CPUs placed as now (a cache line's round trip between "
                           f"two of them {placement.after_ns:.0f} ns): other work, perhaps on another virtual "
                           "machine, was using the memory or the CPUs")
        else:
            if elsewhere:
                why = (f"this machine's CPUs sat otherwise than when the host's figure was measured: a cache line's "
                       f"round trip between two of them took {placement.after_ns:.0f} ns, "
                       f"{placement.host_figure_ns:.0f} ns then; the hypervisor places them, and the bandwidth they "
                       "reach comes with the place")
            else:
                why = ("other work, perhaps on another virtual machine, was using the memory or the CPUs, or the "
                       "hypervisor had placed this machine's CPUs where they reach less of it")
            reasons.append(f"right after measurement a read of memory reached {memory.read_bandwidth_gb_s:.1f} GB/s, "
                           f"{memory.share:.0%} of this host's {memory.host_read_bandwidth_gb_s:.1f} GB/s ({why})")
    if cores is not None and cores.share is not None and cores.share < MIN_CORE_SPEED_SHARE:
        reasons.append(f"right after measurement the cores ran at {cores.share:.0%} of their best on this host (a "
                       f"matrix product {cores.matmul_gflop_s:.0f} of {cores.host_matmul_gflop_s:.0f} GFLOP/s, a small "
                       f"operator {cores.op_us:.2f} us against {cores.host_op_us:.2f}: other work on these cores or "
                       "their hyperthread siblings, perhaps in another virtual machine, or a lower clock)")
    if cpu is not None and cpu.throttle_events:
        reasons.append(f"the CPUs were thermally throttled {cpu.throttle_events} times during measurement")
    if gpu is not None:
        slowed = sorted(GPU_SLOWDOWN_REASONS & (set(gpu.clock_reasons_before) | set(gpu.clock_reasons_after)))
        if slowed:
            reasons.append(f"the GPU was clocked down ({', '.join(slowed)})")
        if (gpu.thermal_throttle_share or 0.0) > MAX_GPU_THERMAL_SHARE:
            reasons.append(f"the GPU was clocked down for heat {gpu.thermal_throttle_share:.0%} of the time")
        if gpu.own_pid_visible and (gpu.other_sm_percent or 0.0) > MAX_OTHER_GPU_SM_PERCENT:
            reasons.append(f"other processes used {gpu.other_sm_percent:.0f}% of the GPU's SMs during measurement")
    next_cv, e2e_cv = metrics.get("next_token_latency_cv"), metrics.get("e2e_latency_cv")
    steps = sum(max(0, len(it.get("token_latencies_s") or []) - 1) for it in iterations)
    if next_cv is not None and steps >= MIN_NEXT_TOKEN_STEPS and next_cv > MAX_NEXT_TOKEN_CV:
        reasons.append(f"next-token latencies vary by {next_cv:.0%} (CV)")
    if e2e_cv is not None and len(iterations) >= MIN_E2E_ITERATIONS and e2e_cv > MAX_E2E_CV:
        reasons.append(f"end-to-end latencies vary by {e2e_cv:.0%} across iterations (CV)")
    tokens_ok = all(it.get("generated_tokens") == requested_tokens for it in iterations)
    if not tokens_ok:
        reasons.append(f"some iterations generated other than the {requested_tokens} tokens requested")
    if warmup_iterations == 0:
        reasons.append("no warm-up iteration ran (--num-warmup 0): the first measured one includes one-time costs")
    if not complete:
        reasons.append(f"the run stopped after {len(iterations)} of {requested_iterations} measured iterations")
    return Validity(valid=not reasons, reasons=reasons, complete=complete, iterations_measured=len(iterations),
                    iterations_requested=requested_iterations, warmup_iterations=warmup_iterations,
                    tokens_as_requested=tokens_ok, next_token_latency_cv=next_cv, e2e_latency_cv=e2e_cv, cpu=cpu,
                    gpu=gpu, thresholds=dict(THRESHOLDS), memory=memory, cores=cores,
                    placement=placement)


def warning_line(reasons: list[str]) -> str:
    """The one stderr line of a run that is not valid."""
    return f"warning: {'; '.join(reasons)}: figures are unreliable"
