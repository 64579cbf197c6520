"""Validity, spread, energy and --profile: the threshold logic on synthetic figures, the trackers on this machine,
and whole runs of the default model quiet and beside two busy processes."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmbench.energy import Counter, EnergyMeter, rapl_counters
from llmbench.gpu_watch import GpuFigures
from llmbench.placement import moved
from llmbench.validity import (
    MAX_OTHER_CPU_SHARE,
    MIN_CORE_SPEED_SHARE,
    MIN_MEMORY_BANDWIDTH_SHARE,
    CpuFigures,
    CpuWatch,
    assess,
    read_cpu_times,
    tree_cpu_s,
    warning_line,
)
from tests.conftest import ROOT, error_lines
from tests.test_benchmark import SEED_LABELS, bench_args, only_record

N_NEW, N_ITER = 16, 3


def cpu_figures(other: float, resolution: float = 0.005, steal: float = 0.0, throttle: int | None = None):
    return CpuFigures(cpus=[0, 1], window_s=3.0, other_share=other, other_share_resolution=resolution,
                      own_share=0.9, steal_share=steal, own_pids=[1], load_average_before=[1.0, 1.0, 1.0],
                      load_average_after=[1.0, 1.0, 1.0], frequency_mhz_before=None, frequency_mhz_after=None,
                      frequency_source=None, throttle_events=throttle)


def iterations(n: int = N_ITER, tokens: int = N_NEW) -> list[dict]:
    return [{"generated_tokens": tokens, "token_latencies_s": [0.1] + [0.05] * (tokens - 1)} for _ in range(n)]


def verdict(cpu=None, gpu=None, next_cv=0.12, e2e_cv=0.03, its=None, warmup=1, complete=True, memory=None,
            cores=None, placement=None):
    its = iterations() if its is None else its
    return assess(its, {"next_token_latency_cv": next_cv, "e2e_latency_cv": e2e_cv}, N_ITER, N_NEW, warmup,
                  complete, cpu, gpu, memory, cores, placement)


MEMORY_REASON = "right after measurement a read of memory reached"
CORES_REASON = "right after measurement the cores ran at"
PLACEMENT_REASON = "the hypervisor moved this machine's CPUs during measurement"


def test_quiet_figures_are_valid():
    v = verdict(cpu_figures(0.04))
    assert v.valid and v.reasons == []
    assert v.to_record()["cpu"]["other_share"] == 0.04 and "valid" not in v.to_record()


def test_other_processes_share_makes_a_run_invalid():
    v = verdict(cpu_figures(0.83))
    assert not v.valid
    assert v.reasons == ["other processes used 83% of the CPUs during measurement"]
    assert warning_line(v.reasons) == \
        "warning: other processes used 83% of the CPUs during measurement: figures are unreliable"
    assert verdict(cpu_figures(MAX_OTHER_CPU_SHARE - 0.01)).valid


def test_short_windows_need_the_share_above_the_counters_resolution():
    assert verdict(cpu_figures(0.45, resolution=0.3)).valid  # 0.45 - 0.3 is under the threshold
    assert not verdict(cpu_figures(0.60, resolution=0.3)).valid


def test_steal_and_throttling_are_reasons():
    assert "steal" in verdict(cpu_figures(0.02, steal=0.4)).reasons[0]
    assert "thermally throttled 3 times" in verdict(cpu_figures(0.02, throttle=3)).reasons[0]
    assert verdict(cpu_figures(0.02, throttle=0)).valid


def test_cv_reasons_are_conservative():
    assert verdict(next_cv=0.2, e2e_cv=0.15).valid  # a quiet CPU's usual spread
    assert "next-token latencies vary by 150%" in verdict(next_cv=1.5).reasons[0]
    few_steps = assess(iterations(n=1, tokens=4), {"next_token_latency_cv": 1.5}, 1, 4, 1, True)
    assert few_steps.valid  # 3 steps: too few to judge by the CV
    assert "end-to-end latencies vary by 60%" in verdict(e2e_cv=0.6).reasons[0]
    two = assess(iterations(n=2), {"e2e_latency_cv": 0.6}, 2, N_NEW, 1, True)
    assert two.valid  # 2 iterations: too few to judge by the CV


def test_run_facts_are_reasons():
    assert "no warm-up" in verdict(warmup=0).reasons[0]
    stopped = verdict(its=iterations(n=1), complete=False)
    assert stopped.reasons == ["the run stopped after 1 of 3 measured iterations"]
    short = verdict(its=iterations(tokens=N_NEW - 1))
    assert not short.tokens_as_requested and "other than the 16 tokens" in short.reasons[0]


def test_gpu_reasons():
    assert verdict(gpu=GpuFigures(clock_reasons_after=["sw_power_cap"])).valid
    assert "hw_thermal_slowdown" in verdict(gpu=GpuFigures(clock_reasons_after=["hw_thermal_slowdown"])).reasons[0]
    assert "for heat 30%" in verdict(gpu=GpuFigures(thermal_throttle_share=0.3)).reasons[0]
    # Other processes' SM use counts only where NVML's process ids are ours to compare (not in a container).
    assert verdict(gpu=GpuFigures(own_pid_visible=False, other_sm_percent=60.0)).valid
    assert "60% of the GPU" in verdict(gpu=GpuFigures(own_pid_visible=True, other_sm_percent=60.0)).reasons[0]


def test_proc_stat_parsing():
    hz = os.sysconf("SC_CLK_TCK")
    text = ("cpu  10 0 10 100 0 0 0 0 0 0\n"
            f"cpu0 {hz} 0 {hz} {2 * hz} 0 0 0 {hz} 0 0\n"
            f"cpu1 {3 * hz} {hz} 0 0 0 0 0 0 {hz} 0\n"
            "intr 1 2 3\n")
    assert read_cpu_times([0], text) == {"busy_s": 2.0, "steal_s": 1.0, "total_s": 5.0}
    assert read_cpu_times([0, 1], text)["busy_s"] == 6.0  # guest time is already inside user
    assert read_cpu_times([7], text) is None


def test_own_process_tree_is_not_counted_as_other():
    """A busy child of this process is this job's own CPU time."""
    watch = CpuWatch()
    watch.start()
    spin = "import time\nwhile time.process_time() < 1.0: pass"
    child = subprocess.Popen([sys.executable, "-c", spin])
    _, _, usage = os.wait4(child.pid, 0)
    child.returncode = 0
    child_s = usage.ru_utime + usage.ru_stime
    t0 = time.process_time()
    while time.process_time() - t0 < 0.3:
        pass
    figures = watch.stop()
    own_s = figures.own_share * figures.window_s * len(figures.cpus)
    assert child_s >= 1.0 and own_s >= 0.3 + child_s - 0.1, (own_s, child_s)
    assert 0.0 <= figures.other_share <= 1.0 and figures.other_share_resolution > 0
    print(f"other processes' share during this test: {figures.other_share:.1%}")


def test_tree_cpu_time_of_a_gone_process_is_zero():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert tree_cpu_s([proc.pid]) == 0.0


def test_rapl_counters_from_powercap(tmp_path):
    zone = tmp_path / "intel-rapl:0"
    (zone / "intel-rapl:0:0").mkdir(parents=True)  # a subzone (core): inside the package, not summed
    (zone / "name").write_text("package-0\n")
    (zone / "energy_uj").write_text("999000000\n")
    (zone / "max_energy_range_uj").write_text("1000000000\n")
    (tmp_path / "intel-rapl:1").mkdir()
    (tmp_path / "intel-rapl:1" / "name").write_text("psys\n")  # the platform: would count the package twice
    counters, reason = rapl_counters(tmp_path)
    assert reason is None and [c.source for c in counters] == ["rapl:package-0"]
    meter = EnergyMeter(None, (counters, None))
    meter.start()
    (zone / "energy_uj").write_text("3000000\n")  # wrapped past 1000 J: 1 J + 3 J
    energy = meter.stop(generated_tokens=8)
    assert energy.joules == pytest.approx(4.0) and energy.joules_per_token == pytest.approx(0.5)
    assert energy.average_watts > 0 and energy.reason is None


def test_no_rapl_counter_gives_a_reason(tmp_path):
    counters, reason = rapl_counters(tmp_path / "absent")
    assert counters == [] and "no RAPL counter" in reason
    energy = EnergyMeter(None, (counters, reason))
    energy.start()
    result = energy.stop(4)
    assert result.joules is None and result.reason == reason


def test_energy_meter_sums_counters():
    readings = iter([10.0, 12.5])
    meter = EnergyMeter(None, ([Counter("test", "scope", lambda: next(readings))], None))
    meter.start()
    assert meter.stop(generated_tokens=5).joules_per_token == pytest.approx(0.5)


# Whole runs: the default model, eager, fp32, greedy, 32 in / 16 new, 3 iterations (one warm-up).
DEFAULT_RUN = ("--dtype", "float32", "--greedy", "--input-tokens", "32", "--max-new-tokens", str(N_NEW),
               "--num-iter", str(N_ITER), "--num-warmup", "1", "--token-latency")


def check_spread(record, stdout: str):
    metrics = record["metrics"]
    for name in ("e2e_latency", "first_token_latency", "next_token_latency"):
        assert metrics[f"{name}_stddev_s"] > 0
        assert metrics[f"{name}_cv"] == pytest.approx(metrics[f"{name}_stddev_s"] / metrics[f"{name}_s"])
    e2e = [it["e2e_latency_s"] for it in record["iterations"]]
    mean = sum(e2e) / len(e2e)
    stddev = (sum((x - mean) ** 2 for x in e2e) / (len(e2e) - 1)) ** 0.5
    assert metrics["e2e_latency_stddev_s"] == pytest.approx(stddev)
    assert metrics["throughput_stddev_tokens_per_s"] > 0
    lines = stdout.splitlines()
    seed = [i for i, line in enumerate(lines) if line.startswith(SEED_LABELS + ("P50 2... latency:", "Throughput:"))]
    spread = [i for i, line in enumerate(lines) if line.startswith("Spread, ")]
    assert len(seed) == 7 and len(spread) == 4 and min(spread) > max(seed)
    assert f"Spread, inference: {metrics['e2e_latency_s']:.3f} ± {stddev:.3f} sec." in stdout


def check_energy(record):
    energy = record["energy"]
    if energy["joules"] is None:
        assert energy["reason"] and energy["joules_per_token"] is None
    else:
        assert energy["joules"] > 0 and energy["joules_per_token"] > 0 and energy["average_watts"] > 0


def test_default_model_quiet_run_is_valid(cli, tmp_path):
    """On a quiet machine (CI) the record says valid: true. Beside other work it must say why not."""
    results = tmp_path / "quiet.jsonl"
    proc = cli(*bench_args(None, results, *DEFAULT_RUN))
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = only_record(results)
    share = record["validity"]["cpu"]["other_share"]
    own = record["validity"]["cpu"]["own_share"]
    print(f"other processes used {share:.1%} of the CPUs, this run {own:.1%}; reasons: {record['validity']['reasons']}")
    check_spread(record, proc.stdout)
    check_energy(record)
    # The memory and the cores are checked too; other virtual machines on CI's host may take the memory's bandwidth
    # or the cores' siblings, and the hypervisor may move the CPUs during the run, none of which this machine can
    # prevent: then the record must say so, and nothing else.
    memory, cores = record["validity"]["memory"], record["validity"]["cores"]
    print(f"memory right after measurement: {memory['read_bandwidth_gb_s']:.1f} GB/s, {memory['share']:.0%} of "
          f"the host's {memory['host_read_bandwidth_gb_s']:.1f} GB/s; cores: {cores['share']:.0%} of their best")
    assert memory["read_bandwidth_gb_s"] > 0 and memory["error"] is None
    assert cores["matmul_gflop_s"] > 0 and cores["op_us"] > 0 and cores["error"] is None
    host_reasons = (MEMORY_REASON, CORES_REASON, PLACEMENT_REASON)
    assert [r for r in record["validity"]["reasons"] if not r.startswith(host_reasons)] == []
    # where the CPUs sat otherwise than when the host's figure was read, their placement's best is the one to reach
    placement = record["validity"]["placement"]
    stayed = not moved(placement["before_ns"], placement["after_ns"])
    assert any(r.startswith(PLACEMENT_REASON) for r in record["validity"]["reasons"]) is not stayed
    elsewhere = moved(placement["after_ns"], placement["host_figure_ns"])
    memory_ok = (memory["placement_share"] or 0) >= MIN_MEMORY_BANDWIDTH_SHARE if elsewhere and memory[
        "placement_share"] is not None else memory["share"] >= MIN_MEMORY_BANDWIDTH_SHARE
    assert record["valid"] is (stayed and memory_ok and cores["share"] >= MIN_CORE_SPEED_SHARE), \
        record["validity"]["reasons"]
    assert ("figures are unreliable" in proc.stderr) is not record["valid"]
    assert own > 0.3  # alone on the machine, the decode's threads keep the CPUs busy


def test_default_model_beside_two_busy_processes_is_not_valid(cli, tmp_path):
    results = tmp_path / "busy.jsonl"
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        time.sleep(1.0)
        proc = cli(*bench_args(None, results, *DEFAULT_RUN))
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = only_record(results)
    share = record["validity"]["cpu"]["other_share"]
    print(f"beside two busy loops, other processes used {share:.1%} of the CPUs")
    assert record["valid"] is False
    assert share > MAX_OTHER_CPU_SHARE
    assert record["validity"]["reasons"][0] == f"other processes used {share:.0%} of the CPUs during measurement"
    warnings = [line for line in error_lines(proc.stderr) if line.startswith("warning:")]
    assert warnings == [f"warning: {'; '.join(record['validity']['reasons'])}: figures are unreliable"]
    check_spread(record, proc.stdout)


def test_profile_writes_a_perfetto_trace_outside_the_figures(run_main, tmp_path, tiny_llama):
    results, folder = tmp_path / "r.jsonl", tmp_path / "prof"
    status, out, err = run_main(*bench_args(tiny_llama, results, "--greedy", "--dtype", "float32", "--input-tokens",
                                            "16", "--max-new-tokens", "6", "--num-iter", "2", "--num-warmup", "1",
                                            "--token-latency", "--quiet", "--profile", str(folder)))
    assert status == 0, err
    record = only_record(results)
    assert len(record["iterations"]) == 2  # the profiled generation is not among the measured ones
    profile = record["profile"]
    trace = json.loads(Path(profile["trace_file"]).read_text())
    events = trace["traceEvents"]
    assert isinstance(events, list) and any(e.get("name", "").startswith("aten::") for e in events)
    assert Path(profile["trace_file"]).parent == folder.resolve()
    table = Path(profile["table_file"]).read_text()
    assert "Self CPU" in table and "aten::" in table
    assert profile["top_operators"][0]["self_time_s"] >= profile["top_operators"][-1]["self_time_s"] > 0
    assert "Top operators by self time" in out and profile["trace_file"] in out
    check_energy(record)
    assert isinstance(record["valid"], bool) and record["validity"]["cpu"]["window_s"] > 0


@pytest.mark.parametrize("extra, message", [
    (["--profile", "FILE"], "is a file, not a folder"),
    (["--profile", "DIR", "--accuracy-only"], "--profile profiles a benchmark run"),
])
def test_profile_bad_input_is_one_line(run_main, tmp_path, extra, message):
    (tmp_path / "FILE").write_text("x")
    extra = [str(tmp_path / e) if e in ("FILE", "DIR") else e for e in extra]
    status, _, err = run_main(*[a for a in bench_args(None, tmp_path / "r.jsonl", *extra) if a != "--benchmark"])
    assert status == 2
    lines = error_lines(err)
    assert len(lines) == 1 and message in lines[0], err


def test_distributed_record_counts_the_ranks_as_its_own(tmp_path, tiny_llama):
    """Rank 0's record carries validity; both ranks (and their launcher) are this job's own processes."""
    from tests.test_distributed import mpirun

    results = tmp_path / "tp.jsonl"
    done = mpirun("--prepend-rank", sys.executable, str(ROOT / "run_generation_with_deepspeed.py"),
                  "--benchmark", "-m", str(tiny_llama), "--greedy", "--dtype", "float32", "--input-tokens", "16",
                  "--max-new-tokens", "8", "--num-iter", "2", "--num-warmup", "1", "--token-latency", "--quiet",
                  "--results", str(results))
    assert done.returncode == 0, done.stderr[-2000:]
    record = only_record(results)
    assert record["world_size"] == 2 and isinstance(record["valid"], bool)
    cpu = record["validity"]["cpu"]
    assert len(cpu["own_pids"]) == 2 and os.getpid() not in cpu["own_pids"]
    assert 0.0 <= cpu["other_share"] <= 1.0
    check_energy(record)


def test_gpu_watch_and_energy_on_cuda_or_the_reason_without_it():
    """With an NVIDIA GPU, NVML's figures; without one, the reason they are missing (never an error)."""
    import torch

    from llmbench.energy import nvml_counters
    from llmbench.gpu_watch import GpuWatch

    device = torch.device("cuda", 0)
    watch = GpuWatch(device, [os.getpid()])
    watch.start()
    figures = watch.stop()
    counters, reason = nvml_counters(device)
    if torch.cuda.is_available():
        assert figures.unreadable is None and figures.name and figures.sm_clock_mhz_max > 0
        assert counters or reason
    else:
        assert figures.unreadable and figures.name is None
        assert counters == [] and reason
