"""The checks of the host right after a cpu run's measured iterations: the memory's read bandwidth against the host's
figure (llmbench.roofline) and the cores' speed against their best on this host (llmbench.core_speed)."""

import json
import os

import pytest
import torch

from llmbench.core_speed import best_file, core_speed_method, host_best
from llmbench.validity import MIN_CORE_SPEED_SHARE, MIN_MEMORY_BANDWIDTH_SHARE, CoreFigures, CpuFigures, MemoryFigures
from tests.test_benchmark import bench_args, only_record
from tests.test_validity import CORES_REASON, MEMORY_REASON, cpu_figures, verdict

TINY_RUN = ("--greedy", "--dtype", "float32", "--input-tokens", "16", "--max-new-tokens", "6", "--num-iter", "2",
            "--num-warmup", "1", "--token-latency", "--quiet")


def test_memory_bandwidth_below_the_hosts_makes_a_run_invalid():
    def memory(gb_s):
        return MemoryFigures(gb_s, 31.2, gb_s / 31.2, "sum of a 1 GiB float32 tensor, 2 threads, best of 3")

    low = verdict(cpu_figures(0.02), memory=memory(21.2))
    assert not low.valid
    assert low.reasons == ["right after measurement a read of memory reached 21.2 GB/s, 68% of this host's 31.2 GB/s "
                           "(other work, perhaps on another virtual machine, was using the memory or the CPUs, or the "
                           "hypervisor had placed this machine's CPUs where they reach less of it)"]
    assert low.to_record()["memory"]["share"] == 21.2 / 31.2
    assert verdict(cpu_figures(0.02), memory=memory(31.2 * MIN_MEMORY_BANDWIDTH_SHARE + 0.1)).valid
    failed = MemoryFigures(None, 31.2, None, None, error="MemoryError: no room")
    assert verdict(cpu_figures(0.02), memory=failed).valid  # a check that could not run says so, and no more


def test_memory_slower_than_the_hosts_figure_is_reported(run_main, tmp_path, tiny_llama, monkeypatch):
    """A host figure far above what the memory gives now (as when another virtual machine takes most of it) makes
    the run invalid with the figures behind the verdict; a bandwidth set by the user is not checked."""
    import torch

    from llmbench.roofline import cache_file, cpu_read_method

    monkeypatch.setenv("LLMBENCH_CACHE", str(tmp_path / "cache"))
    threads = os.cpu_count()
    host = cache_file(torch.device("cpu"), threads)
    host.parent.mkdir(parents=True)
    host.write_text(json.dumps({"bandwidth_gb_s": 1e5, "method": cpu_read_method(threads)}))
    args = ("--greedy", "--dtype", "float32", "--input-tokens", "16", "--max-new-tokens", "6", "--num-iter", "2",
            "--num-warmup", "1", "--token-latency", "--quiet")
    status, out, err = run_main(*bench_args(tiny_llama, tmp_path / "slow.jsonl", *args))
    assert status == 0, err
    record = only_record(tmp_path / "slow.jsonl")
    memory = record["validity"]["memory"]
    assert record["roofline"]["source"] == "cache" and memory["host_read_bandwidth_gb_s"] == 1e5
    assert 0 < memory["read_bandwidth_gb_s"] < 1e4 and memory["share"] == memory["read_bandwidth_gb_s"] / 1e5
    assert memory["method"] == cpu_read_method(threads, repeats=3)
    assert record["valid"] is False and any(r.startswith(MEMORY_REASON) for r in record["validity"]["reasons"])
    assert f"of this host's {1e5:.1f} GB/s" in err
    # where the CPUs sat before and after (llmbench.placement); the host's figure here was written without it
    placement = record["validity"]["placement"]
    assert placement["before_ns"] > 0 and placement["after_ns"] > 0 and placement["host_figure_ns"] is None
    # The roofline drawn at what the memory gave during the run, beside the host's: the steps' share of each
    roofline, metrics = record["roofline"], record["metrics"]
    assert roofline["run_read_bandwidth_gb_s"] == memory["read_bandwidth_gb_s"]
    assert metrics["roofline_fraction_at_run_bandwidth"] == pytest.approx(
        metrics["roofline_fraction"] * 1e5 / memory["read_bandwidth_gb_s"])
    line = next(line for line in out.splitlines() if line.startswith("Roofline:"))
    assert (f"({metrics['roofline_fraction_at_run_bandwidth'] * 100:.0f}% at the "
            f"{memory['read_bandwidth_gb_s']:.1f} GB/s this run's memory check read)") in line
    monkeypatch.setenv("LLMBENCH_READ_BANDWIDTH_GB_S", "1e5")
    status, _, err = run_main(*bench_args(tiny_llama, tmp_path / "set.jsonl", *args))
    assert status == 0, err
    assert only_record(tmp_path / "set.jsonl")["validity"]["memory"] is None


def test_a_quiet_check_above_the_hosts_figure_raises_it(run_main, tmp_path, tiny_llama, monkeypatch):
    """A host figure below what the memory gives (measured first in a poor moment of a shared host): a quiet run's
    check raises it, in the cache and in this record's roofline; a run beside other work leaves it."""
    from llmbench.roofline import cache_file, cpu_read_method

    monkeypatch.setenv("LLMBENCH_CACHE", str(tmp_path / "cache"))
    threads = os.cpu_count()
    host = cache_file(torch.device("cpu"), threads)
    host.parent.mkdir(parents=True)
    host.write_text(json.dumps({"bandwidth_gb_s": 0.01, "method": cpu_read_method(threads)}))
    status, _, err = run_main(*bench_args(tiny_llama, tmp_path / "low.jsonl", *TINY_RUN))
    assert status == 0, err
    record = only_record(tmp_path / "low.jsonl")
    memory, roofline = record["validity"]["memory"], record["roofline"]
    cached = json.loads(host.read_text())
    if record["validity"]["cpu"]["other_share"] > 0.25:  # others' work: no figure of this run is kept
        assert memory["raised_from_gb_s"] is None and cached["bandwidth_gb_s"] == 0.01
        return
    assert memory["raised_from_gb_s"] == 0.01 and memory["share"] == 1.0
    assert cached["bandwidth_gb_s"] == memory["read_bandwidth_gb_s"] == roofline["read_bandwidth_gb_s"] > 0.01
    assert cached["method"] == cpu_read_method(threads) and "memory check" in cached["raised_by"]
    # with where the CPUs sat when it was read (round trips before and after the read; None: they moved during it)
    assert cached["placement_round_trip_ns"] == memory["placement_ns"]
    assert memory["placement_ns"] is None or memory["placement_ns"] > 0
    assert record["validity"]["placement"]["host_figure_ns"] == cached["placement_round_trip_ns"]
    assert roofline["raised_after_measurement_from_gb_s"] == 0.01
    assert roofline["roofline_next_token_s"] == roofline["bytes_read_per_token"] / (cached["bandwidth_gb_s"] * 1e9)
    assert record["metrics"]["roofline_next_token_s"] == roofline["roofline_next_token_s"]
    assert record["metrics"]["roofline_fraction_at_run_bandwidth"] == pytest.approx(
        record["metrics"]["roofline_fraction"])  # the raised figure is the run's own
    assert record["valid"] or not any(r.startswith(MEMORY_REASON) for r in record["validity"]["reasons"])


def test_a_run_in_another_placement_is_judged_by_that_placements_best(run_main, tmp_path, tiny_llama, monkeypatch):
    """A host figure read where the CPUs sat otherwise (here a made-up round trip of 1 ms) does not make a quiet run
    invalid for reading less: its check becomes the best of the placement the CPUs sat in, the record draws the
    roofline at that best too, and a second run is judged against it."""
    from llmbench.placement import moved, placement_of
    from llmbench.roofline import cache_file, cpu_read_method

    monkeypatch.setenv("LLMBENCH_CACHE", str(tmp_path / "cache"))
    threads = os.cpu_count()
    host = cache_file(torch.device("cpu"), threads)
    host.parent.mkdir(parents=True)
    host.write_text(json.dumps({"bandwidth_gb_s": 1e5, "method": cpu_read_method(threads),
                                "placement_round_trip_ns": 1e6}))
    status, out, err = run_main(*bench_args(tiny_llama, tmp_path / "first.jsonl", *TINY_RUN))
    assert status == 0, err
    record = only_record(tmp_path / "first.jsonl")
    memory, placement = record["validity"]["memory"], record["validity"]["placement"]
    if memory["placement_ns"] is None or record["validity"]["cpu"]["other_share"] > 0.25:
        # no placement to judge by (one CPU, no C compiler, the CPUs moved during the read) or others' work (nothing
        # kept): the host's figure stands
        assert any(r.startswith(MEMORY_REASON) for r in record["validity"]["reasons"])
        assert "placements" not in json.loads(host.read_text())
        return
    assert placement["host_figure_ns"] == 1e6 and memory["share"] < 0.8
    assert memory["first_in_placement"] and memory["placement_share"] == 1.0
    assert memory["placement_read_bandwidth_gb_s"] == memory["read_bandwidth_gb_s"]
    assert not any(r.startswith(MEMORY_REASON) for r in record["validity"]["reasons"])
    assert record["roofline"]["placement_read_bandwidth_gb_s"] == memory["read_bandwidth_gb_s"]
    fraction = record["metrics"]["roofline_fraction_at_placement_bandwidth"]
    assert fraction == pytest.approx(record["metrics"]["roofline_fraction"] * 1e5 / memory["read_bandwidth_gb_s"])
    line = next(line for line in out.splitlines() if line.startswith("Roofline:"))
    assert (f"; {fraction * 100:.0f}% at the {memory['read_bandwidth_gb_s']:.1f} GB/s this host reads at best with "
            "its CPUs placed as in this run") in line
    cached = json.loads(host.read_text())
    assert cached["bandwidth_gb_s"] == 1e5 and cached["placement_round_trip_ns"] == 1e6
    assert placement_of(cached["placements"], memory["placement_ns"])["bandwidth_gb_s"] == memory[
        "read_bandwidth_gb_s"]
    status, _, err = run_main(*bench_args(tiny_llama, tmp_path / "second.jsonl", *TINY_RUN))
    assert status == 0, err
    second = only_record(tmp_path / "second.jsonl")["validity"]
    if second["memory"]["placement_ns"] and not moved(second["memory"]["placement_ns"], memory["placement_ns"]):
        # the same placement: its best so far
        assert not second["memory"]["first_in_placement"]
        assert second["memory"]["placement_read_bandwidth_gb_s"] >= memory["read_bandwidth_gb_s"]


def test_cores_slower_than_their_best_make_a_run_invalid():
    def cores(gflop_s, op_us):
        share = min(gflop_s / 260.0, 2.9 / op_us)
        return CoreFigures(gflop_s, 260.0, op_us, 2.9, share, "float32 256x256 matrix product ...")

    slow_math = verdict(cpu_figures(0.02), cores=cores(130.0, 2.9))
    assert slow_math.reasons == ["right after measurement the cores ran at 50% of their best on this host (a matrix "
                                 "product 130 of 260 GFLOP/s, a small operator 2.90 us against 2.90: other work on "
                                 "these cores or their hyperthread siblings, perhaps in another virtual machine, or a "
                                 "lower clock)"]
    assert not verdict(cpu_figures(0.02), cores=cores(260.0, 4.0)).valid  # the dispatch alone slowed: 72%
    assert verdict(cpu_figures(0.02), cores=cores(260.0 * MIN_CORE_SPEED_SHARE + 0.1, 2.9)).valid
    assert verdict(cpu_figures(0.02), cores=cores(260.0, 2.9)).to_record()["cores"]["share"] == 1.0
    failed = CoreFigures(None, None, None, None, None, None, error="interrupted (Ctrl-C)")
    assert verdict(cpu_figures(0.02), cores=failed).valid


def test_cores_check_keeps_the_hosts_best(run_main, tmp_path, tiny_llama, monkeypatch):
    """A host's first run sets its best figures; a best far above what the cores give now (as when another virtual
    machine shares them) makes a run invalid, with the figures behind it, and stays the best."""
    monkeypatch.setenv("LLMBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LLMBENCH_READ_BANDWIDTH_GB_S", "25")  # the memory is not checked: this test is the cores'
    status, _, err = run_main(*bench_args(tiny_llama, tmp_path / "first.jsonl", *TINY_RUN))
    assert status == 0, err
    record = only_record(tmp_path / "first.jsonl")
    cores = record["validity"]["cores"]
    probe = {"threads": torch.get_num_threads(), "method": core_speed_method(torch.get_num_threads())}
    assert cores["first_on_host"] is True and cores["share"] == 1.0 and cores["method"] == probe["method"]
    if CpuFigures(**record["validity"]["cpu"]).quiet():  # a busy machine's figures are never kept (watch._quiet)
        kept = host_best(probe)
        assert kept["matmul_gflop_s"] == cores["matmul_gflop_s"] and kept["op_us"] == cores["op_us"]

    best_file(probe["threads"]).parent.mkdir(parents=True, exist_ok=True)  # absent where the first run was busy
    best_file(probe["threads"]).write_text(json.dumps({"matmul_gflop_s": 1e6, "op_us": 1e-3, **probe}))
    status, _, err = run_main(*bench_args(tiny_llama, tmp_path / "slow.jsonl", *TINY_RUN))
    assert status == 0, err
    record = only_record(tmp_path / "slow.jsonl")
    cores = record["validity"]["cores"]
    assert cores["first_on_host"] is False and cores["host_matmul_gflop_s"] == 1e6 and cores["host_op_us"] == 1e-3
    assert 0 < cores["matmul_gflop_s"] < 1e5 and cores["op_us"] > 1e-2
    assert cores["share"] == min(cores["matmul_gflop_s"] / 1e6, 1e-3 / cores["op_us"])
    assert record["valid"] is False and record["validity"]["reasons"][-1].startswith(CORES_REASON)
    assert "of their best on this host" in err
    assert host_best(probe)["matmul_gflop_s"] == 1e6 and host_best(probe)["op_us"] == 1e-3
