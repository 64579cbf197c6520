"""Where this machine's CPUs sit relative to each other (llmbench.placement), and what a record says of it: a
hypervisor that moves a guest's CPUs changes the memory bandwidth they reach and every hand-over between threads."""

import pytest

from llmbench import placement
from llmbench.placement import (
    MOVED_RATIO,
    allowed_cpus,
    host_placements,
    measure_placement,
    moved,
    placement_of,
    with_reading,
)
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


def test_low_memory_in_another_placement_is_judged_against_that_placements_best():
    """A run whose CPUs sat where this host reads 30 GB/s at best (its figure, 60, was read elsewhere) is valid when
    its check reads close to 30; well below that, other work took the memory, said against the placement's figure.
    In the placement of the host's figure, the host's figure is the one to reach."""
    def memory(gb_s, best):
        return MemoryFigures(gb_s, 60.0, gb_s / 60.0, "sum of a 1 GiB float32 tensor, 2 threads, best of 3",
                             placement_read_bandwidth_gb_s=best, placement_share=gb_s / best)

    assert verdict(cpu_figures(0.02), memory=memory(29.0, 30.0), placement=figures(60.0, 62.0, host=310.0)).valid
    slow = verdict(cpu_figures(0.02), memory=memory(15.0, 30.0), placement=figures(60.0, 62.0, host=310.0))
    assert slow.reasons == [f"{MEMORY_REASON} 15.0 GB/s, 50% of the 30.0 GB/s this host reads at best with its CPUs "
                            "placed as now (a cache line's round trip between two of them 62 ns): other work, perhaps "
                            "on another virtual machine, was using the memory or the CPUs"]
    same = verdict(cpu_figures(0.02), memory=memory(30.0, 30.0), placement=figures(60.0, 62.0, host=64.0))
    assert not same.valid and "of this host's 60.0 GB/s" in same.reasons[0]
    unknown = verdict(cpu_figures(0.02), memory=memory(30.0, 30.0), placement=figures(60.0, 62.0))
    assert not unknown.valid  # where the host's figure was read is not known: its figure stands


def test_benchmark_rounds_are_tagged_by_placement_and_rounds_across_a_move_are_told(monkeypatch):
    trips = iter([60.0, 64.0, 62.0, 320.0, 310.0, 330.0, 58.0, 61.0, None, None])
    monkeypatch.setattr(placement, "round_trip_ns", lambda: next(trips))
    seen: list = []
    keys = []
    for _ in range(4):
        with placement.PlacedRound(seen) as where:
            pass
        keys.append(None if where.moved else where.key)
    assert keys == [64.0, None, 330.0, 64.0] and seen == [64.0, 330.0]  # the second round straddled a move
    with placement.PlacedRound([]) as where:  # round trips that cannot be measured: kept, in no known placement
        pass
    assert not where.moved and where.key is None


def test_step_split_groups_rounds_by_placement():
    import sys

    from llmbench.paths import PROJECT_ROOT

    sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))
    from step_split import placement_groups

    assert placement_groups([61.0, 305.0, 58.0, 66.0, 320.0]) == [(58.0, 66.0), (305.0, 320.0)]
    assert placement_groups([61.0, 64.0]) == [(61.0, 64.0)] and placement_groups([]) == []


def test_each_placement_keeps_its_best_read():
    """The cache's placements: a reading joins the nearest placement within MOVED_RATIO (raising its best, never
    lowering it) or adds one; a host figure with a placement counts as that placement's read."""
    seen = with_reading([], 30.0, 61.0)
    assert seen == [{"round_trip_ns": 61.0, "bandwidth_gb_s": 30.0}]
    assert with_reading(seen, 29.0, 70.0) is None and with_reading(seen, 31.0, None) is None
    seen = with_reading(seen, 33.0, 70.0)  # the same placement: its best rises, its round trip stays
    assert seen == [{"round_trip_ns": 61.0, "bandwidth_gb_s": 33.0}]
    seen = with_reading(seen, 50.0, 305.0)
    assert placement_of(seen, 290.0)["bandwidth_gb_s"] == 50.0 and placement_of(seen, 58.0)["bandwidth_gb_s"] == 33.0
    assert placement_of(seen, 1000.0) is None and placement_of(seen, None) is None
    assert host_placements({"bandwidth_gb_s": 60.0, "placement_round_trip_ns": 300.0, "placements": seen}) == [
        {"round_trip_ns": 61.0, "bandwidth_gb_s": 33.0}, {"round_trip_ns": 305.0, "bandwidth_gb_s": 60.0}]
    assert host_placements({"bandwidth_gb_s": 60.0}) == [] and host_placements(None) == []


def test_a_quiet_reading_is_kept_for_the_host_and_its_placement(tmp_path, monkeypatch):
    """A host figure cached before placements were recorded gets the placement of the first quiet check that reads
    at least 80% of it, once; every kept reading raises its placement's best; one above the host's figure becomes
    the host's; a reading not kept (a busy run) changes nothing but still says what its placement has read."""
    import json

    import torch

    from llmbench.bandwidth_cache import note_cpu_reading
    from llmbench.roofline import cache_file, cpu_read_method, host_threads

    monkeypatch.setenv("LLMBENCH_CACHE", str(tmp_path))
    assert note_cpu_reading(40.0, 61.0) == {"raised": False, "placement_gb_s": None, "host_figure_ns": None}
    path = cache_file(torch.device("cpu"), host_threads())
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"bandwidth_gb_s": 60.0, "method": cpu_read_method(host_threads())}))
    assert note_cpu_reading(33.0, 61.0) == {"raised": False, "placement_gb_s": None, "host_figure_ns": None}
    cached = json.loads(path.read_text())
    assert "placement_round_trip_ns" not in cached and cached["placements"] == [
        {"round_trip_ns": 61.0, "bandwidth_gb_s": 33.0}]
    assert note_cpu_reading(49.0, 305.0)["host_figure_ns"] == 305.0
    assert note_cpu_reading(58.0, 61.0) == {"raised": False, "placement_gb_s": 33.0, "host_figure_ns": 305.0}
    cached = json.loads(path.read_text())
    assert cached["bandwidth_gb_s"] == 60.0 and cached["placement_round_trip_ns"] == 305.0
    assert host_placements(cached) == [{"round_trip_ns": 61.0, "bandwidth_gb_s": 58.0},
                                       {"round_trip_ns": 305.0, "bandwidth_gb_s": 60.0}]
    assert note_cpu_reading(90.0, 70.0, keep=False) == {"raised": False, "placement_gb_s": 58.0,
                                                        "host_figure_ns": 305.0}
    assert json.loads(path.read_text()) == cached
    assert note_cpu_reading(65.0, 64.0) == {"raised": True, "placement_gb_s": 58.0, "host_figure_ns": 64.0}
    cached = json.loads(path.read_text())
    assert cached["bandwidth_gb_s"] == 65.0 and "memory check" in cached["raised_by"]
    assert placement_of(host_placements(cached), 64.0)["bandwidth_gb_s"] == 65.0
