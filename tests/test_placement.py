"""Where this machine's CPUs sit relative to each other (llmbench.placement), and what a record says of it: a
hypervisor that moves a guest's CPUs changes the memory bandwidth they reach and every hand-over between threads."""

import pytest

from llmbench import placement
from llmbench.placement import MOVED_RATIO, allowed_cpus, measure_placement, moved
from llmbench.validity import MemoryFigures, PlacementFigures
from tests.test_validity import MEMORY_REASON, cpu_figures, verdict

MOVED_REASON = "the hypervisor moved this machine's CPUs during measurement"
CPUS = allowed_cpus()


@pytest.mark.skipif(len(CPUS) < 2, reason="needs two CPUs to measure between")
def test_a_round_trip_between_two_cpus_is_measured():
    found = measure_placement()
    pairs = found["pairs"]
    assert [p[:2] for p in pairs] == [[CPUS[0], c] for c in CPUS[1:][: len(pairs)]] and 1 <= len(pairs) <= 7
    assert 1 < found["round_trip_ns"] < 1e5 and found["round_trip_ns"] == max(p[2] for p in pairs)
    assert "round trip" in found["method"]
    assert measure_placement(CPUS[:2])["pairs"][0][:2] == CPUS[:2]


def test_what_cannot_be_measured_says_why(monkeypatch, tmp_path):
    assert measure_placement(CPUS[:1]) == {"error": "this process may use 1 CPU: no pair to measure"}
    outside = max(CPUS) + 1000  # a CPU this process may not use: its thread cannot be pinned there
    assert "no round trip between CPUs" in measure_placement([CPUS[0], outside])["error"]
    monkeypatch.setenv("LLMBENCH_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    monkeypatch.setattr(placement, "_library", None)
    assert measure_placement(CPUS[:2] if len(CPUS) > 1 else [0, 1])["error"].startswith(
        "building llmbench/placement.c failed")


def test_placements_apart_by_more_than_the_ratio_are_different():
    assert moved(60.0, 300.0) and moved(300.0, 60.0) and moved(60.0, 60.0 * MOVED_RATIO + 1)
    assert not moved(60.0, 90.0) and not moved(None, 300.0) and not moved(60.0, None)


def figures(before, after, host=None):
    return PlacementFigures(before, after, host, "round trip ...")


def test_cpus_moved_during_measurement_make_a_run_invalid():
    v = verdict(cpu_figures(0.02), placement=figures(61.0, 305.0))
    assert not v.valid
    assert v.reasons == [f"{MOVED_REASON} (a cache line's round trip between two of them took 61 ns before, 305 ns "
                         "after): the figures mix two placements, whose memory bandwidth and thread hand-overs differ"]
    assert v.to_record()["placement"]["after_ns"] == 305.0
    assert verdict(cpu_figures(0.02), placement=figures(61.0, 70.0)).valid
    assert verdict(cpu_figures(0.02), placement=PlacementFigures(None, None, None, None, error="no pair")).valid


def test_low_memory_in_another_placement_names_it():
    """A run's memory below the host's figure: where the CPUs sat otherwise when that figure was read, the reason
    says so with both round trips, not that other work may have taken the memory."""
    low = MemoryFigures(30.0, 60.0, 0.5, "sum of a 1 GiB float32 tensor, 2 threads, best of 3")
    apart = verdict(cpu_figures(0.02), memory=low, placement=figures(60.0, 62.0, host=310.0))
    assert apart.reasons == [f"{MEMORY_REASON} 30.0 GB/s, 50% of this host's 60.0 GB/s (this machine's CPUs sat "
                             "otherwise than when the host's figure was measured: a cache line's round trip between "
                             "two of them took 62 ns, 310 ns then; the hypervisor places them, and the bandwidth they "
                             "reach comes with the place)"]
    same = verdict(cpu_figures(0.02), memory=low, placement=figures(60.0, 62.0, host=64.0))
    assert len(same.reasons) == 1 and "other work, perhaps on another virtual machine" in same.reasons[0]


def test_step_split_groups_rounds_by_placement():
    import sys

    from llmbench.paths import PROJECT_ROOT

    sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))
    from step_split import placement_groups

    assert placement_groups([61.0, 305.0, 58.0, 66.0, 320.0]) == [(58.0, 66.0), (305.0, 320.0)]
    assert placement_groups([61.0, 64.0]) == [(61.0, 64.0)] and placement_groups([]) == []


def test_a_close_reading_names_the_placement_of_an_older_host_figure(tmp_path, monkeypatch):
    """A host figure cached before placements were recorded gets the placement of the first quiet check that reads
    at least 80% of it, once; readings further off (another placement, or other work) leave it unnamed."""
    import json

    import torch

    from llmbench.roofline import cache_file, cpu_read_method, host_threads, note_cpu_placement

    monkeypatch.setenv("LLMBENCH_CACHE", str(tmp_path))
    path = cache_file(torch.device("cpu"), host_threads())
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"bandwidth_gb_s": 60.0, "method": cpu_read_method(host_threads())}))
    assert not note_cpu_placement(33.0, 61.0) and "placement_round_trip_ns" not in json.loads(path.read_text())
    assert note_cpu_placement(49.0, 305.0) and json.loads(path.read_text())["placement_round_trip_ns"] == 305.0
    assert not note_cpu_placement(58.0, 61.0) and json.loads(path.read_text())["placement_round_trip_ns"] == 305.0
    assert json.loads(path.read_text())["bandwidth_gb_s"] == 60.0
