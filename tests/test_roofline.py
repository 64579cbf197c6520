"""The roofline in every benchmark record: bytes read per step, the host's cached bandwidth, the override."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmbench import host
from llmbench import roofline as rl
from llmbench.errors import UserError
from llmbench.host import cpu_kind, last_level_cache_bytes
from llmbench.models import load_model, weight_bytes
from llmbench.records import read_records
from tests.conftest import ROOT
from tests.tiny import TINY_SHAPES, tiny_family_config, tiny_llama_config

CPU = torch.device("cpu")


def test_record_has_a_consistent_roofline(run_main, tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setenv(rl.OVERRIDE_ENV, "20")
    results = tmp_path / "r.jsonl"
    status, out, err = run_main("--benchmark", "-m", str(tiny_llama), "--device", "cpu", "--dtype", "float32",
                                "--num-beams", "2", "--batch-size", "2", "--input-tokens", "10", "--max-new-tokens",
                                "6", "--num-iter", "2", "--num-warmup", "0", "--token-latency", "--quiet",
                                "--results", str(results))
    assert status == 0, err
    (record,) = read_records(results)
    roofline, metrics = record["roofline"], record["metrics"]
    assert roofline["source"] == rl.OVERRIDE_ENV and roofline["read_bandwidth_gb_s"] == 20
    # Tiny Llama: 2 layers, 2 key/value heads of 16 dims, float32; 4 rows (batch 2 x beams 2) at position 10 + 6 / 2.
    kv = 2 * 2 * 2 * 16 * 4 * 4 * 13
    assert roofline["mean_context_tokens"] == 13 and roofline["kv_cache_bytes_read_per_token"] == kv
    embedding_bytes = 600 * 64 * 4  # untied: the step reads one row of it, not the table
    assert roofline["weight_bytes_read_per_token"] == record["weight_bytes"] - embedding_bytes
    assert roofline["bytes_read_per_token"] == roofline["weight_bytes_read_per_token"] + kv
    assert metrics["roofline_next_token_s"] == pytest.approx(roofline["bytes_read_per_token"] / 20e9)
    assert metrics["roofline_fraction"] == pytest.approx(
        metrics["roofline_next_token_s"] / metrics["next_token_latency_s"])
    assert 0 < metrics["roofline_fraction"] < 1
    assert metrics["roofline_fraction_at_run_bandwidth"] is None  # a bandwidth set by the user is not checked
    line = next(line for line in out.splitlines() if line.startswith("Roofline:"))
    assert f"{metrics['roofline_fraction'] * 100:.0f}% of roofline" in line and rl.OVERRIDE_ENV in line
    assert out.index("Weight read bandwidth:") < out.index("Roofline:")
    if last_level_cache_bytes():  # a tiny model's step fits in any CPU's last-level cache: the line says so
        assert roofline["fits_in_last_level_cache"] is True and "last-level cache" in line


def test_the_last_level_cache_is_read_from_sysfs_and_named_where_a_step_fits_in_it(tmp_path, monkeypatch):
    for index, (level, kind, size) in enumerate([(1, "Data", "48K"), (1, "Instruction", "64K"), (2, "Unified", "2048K"),
                                                 (3, "Unified", "491520K")]):
        folder = tmp_path / f"index{index}"
        folder.mkdir()
        for name, value in (("level", level), ("type", kind), ("size", size)):
            (folder / name).write_text(f"{value}\n")
    monkeypatch.setattr(host, "CACHES", tmp_path)
    host.last_level_cache_bytes.cache_clear()
    try:
        assert host.last_level_cache_bytes() == 480 << 20
    finally:
        host.last_level_cache_bytes.cache_clear()
    metrics = {"roofline_next_token_s": 0.01, "roofline_fraction": 0.8}
    info = {"bytes_read_per_token": 270_500_000, "read_bandwidth_gb_s": 27.0, "source": "cache",
            "last_level_cache_bytes": 480 << 20, "fits_in_last_level_cache": True}
    assert "270.5 MB a step reads fit in this CPU's 480 MiB last-level cache" in rl.roofline_line(metrics, info)
    assert "cache," not in rl.roofline_line(metrics, {**info, "fits_in_last_level_cache": False})
    assert host.parse_cache_size("32M") == 32 << 20 and host.parse_cache_size("1024") == 1024


def test_without_token_latency_the_roofline_has_no_fraction(run_main, tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setenv(rl.OVERRIDE_ENV, "20")
    results = tmp_path / "r.jsonl"
    status, out, err = run_main("--benchmark", "-m", str(tiny_llama), "--device", "cpu", "--greedy",
                                "--input-tokens", "8", "--max-new-tokens", "3", "--num-iter", "1", "--num-warmup",
                                "0", "--quiet", "--results", str(results))
    assert status == 0, err
    (record,) = read_records(results)
    assert record["metrics"]["roofline_next_token_s"] > 0 and record["metrics"]["roofline_fraction"] is None
    assert "% of roofline" not in out


@pytest.mark.parametrize("value", ["fast", "0", "-3"])
def test_bad_override_is_one_line(run_main, tmp_path, tiny_llama, monkeypatch, value):
    monkeypatch.setenv(rl.OVERRIDE_ENV, value)
    status, _, err = run_main("--benchmark", "-m", str(tiny_llama), "--device", "cpu", "--greedy",
                              "--num-iter", "1", "--num-warmup", "0", "--quiet", "--results", str(tmp_path / "r.jsonl"))
    assert status == 2
    assert err.strip().splitlines() == [f"run_generation.py: error: {rl.OVERRIDE_ENV}={value!r}: expected a positive "
                                        "number of GB/s, e.g. 25.1"]


def test_override_wins_and_measures_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMBENCH_CACHE", str(tmp_path))
    monkeypatch.setenv(rl.OVERRIDE_ENV, "12.5")
    info = rl.device_bandwidth(CPU)
    assert info["read_bandwidth_gb_s"] == 12.5 and info["source"] == rl.OVERRIDE_ENV
    assert not (tmp_path / "host").exists()


def test_bandwidth_is_measured_once_then_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMBENCH_CACHE", str(tmp_path))
    monkeypatch.delenv(rl.OVERRIDE_ENV, raising=False)
    monkeypatch.setattr(rl, "BUSY_LIMIT", 1.0)  # cache whatever this shared test machine measures
    first = rl.device_bandwidth(CPU)
    assert first["source"] == "measured" and first["read_bandwidth_gb_s"] > 0.1
    assert first["method"] == f"sum of a 1 GiB float32 tensor, {os.cpu_count()} threads, best of 10"
    assert first["placement_round_trip_ns"] > 0  # where the CPUs sat when it was read (llmbench.placement)
    assert first["placements"] == [{"round_trip_ns": first["placement_round_trip_ns"],
                                    "bandwidth_gb_s": first["read_bandwidth_gb_s"]}]  # each placement's best
    (path,) = (tmp_path / "host").glob("*.json")
    assert path.name.startswith(socket.gethostname() + "-cpu-")
    second = rl.device_bandwidth(CPU)
    assert second["source"] == "cache" and second["read_bandwidth_gb_s"] == first["read_bandwidth_gb_s"]
    # A figure measured in a busy moment does not stick: a refresh keeps the best figure seen.
    entry = json.loads(path.read_text())
    path.write_text(json.dumps({**entry, "bandwidth_gb_s": 0.001}))
    refreshed = rl.measured_bandwidth(CPU, refresh=True)
    assert refreshed["bandwidth_gb_s"] == refreshed["last_measured_gb_s"] > 0.1
    assert refreshed["placement_round_trip_ns"] > 0
    path.write_text(json.dumps({**entry, "bandwidth_gb_s": 1e6, "placement_round_trip_ns": 123.0}))
    kept = rl.measured_bandwidth(CPU, refresh=True)  # a lower reading keeps the best figure with its placement
    assert kept["bandwidth_gb_s"] == 1e6 and kept["placement_round_trip_ns"] == 123.0
    path.write_text(json.dumps({**entry, "bandwidth_gb_s": 1e6}))
    assert rl.device_bandwidth(CPU)["read_bandwidth_gb_s"] == 1e6  # the cache, not a new measurement
    # A cache entry of another method (another thread count, a changed procedure) is not used.
    path.write_text(json.dumps({**entry, "method": "something else", "bandwidth_gb_s": 1e6}))
    with pytest.raises(RuntimeError, match="no cached bandwidth"):
        rl.measured_bandwidth(CPU, measure=False)


def test_a_measurement_on_a_busy_host_is_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMBENCH_CACHE", str(tmp_path))
    monkeypatch.delenv(rl.OVERRIDE_ENV, raising=False)
    monkeypatch.setattr(rl, "BUSY_LIMIT", -1.0)  # any load counts as busy
    info = rl.device_bandwidth(CPU)
    assert info["source"] == "measured" and info["read_bandwidth_gb_s"] > 0.1
    assert "busy with other work" in info["not_cached"] and 0 <= info["cpu_busy_before"] <= 1
    assert not list(tmp_path.glob("host/*.json"))


def test_weight_bytes_read_skip_an_untied_input_embedding(tokenizer):
    untied = AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer)))
    table = untied.get_input_embeddings().weight
    assert rl.weight_bytes_read_per_token(untied) == weight_bytes(untied) - table.numel() * table.element_size()
    config = tiny_llama_config(len(tokenizer))
    config.tie_word_embeddings = True
    tied = AutoModelForCausalLM.from_config(config)
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    assert rl.weight_bytes_read_per_token(tied) == weight_bytes(tied)


def test_default_model_bytes_read(tmp_path):
    """SmolLM2-135M: tied embeddings, so every weight is read; 30 layers x 3 key/value heads x 64 dims."""
    loaded = load_model(None, CPU, torch.bfloat16, quiet=True)
    read = rl.decode_bytes_read(loaded.model, torch.bfloat16, rows=1, input_tokens=32, max_new_tokens=64)
    assert read["weight_bytes_read_per_token"] == weight_bytes(loaded.model) == 2 * 134_515_008
    assert rl.kv_cache_bytes_per_position(loaded.model.config, torch.bfloat16) == 2 * 30 * 3 * 64 * 2
    assert read["kv_cache_bytes_read_per_token"] == 2 * 30 * 3 * 64 * 2 * 64


@pytest.mark.parametrize("family", ["gpt2", "falcon", "gemma", "opt"])
def test_kv_bytes_follow_each_family_config(family):
    config = tiny_family_config(family, 600)
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, 600, (1, 5))
    cache = model(ids, use_cache=True).past_key_values
    keys = [layer.keys for layer in cache.layers] if hasattr(cache, "layers") else [kv[0] for kv in cache]
    per_position = sum(2 * k.numel() * k.element_size() for k in keys) // 5
    assert rl.kv_cache_bytes_per_position(config, torch.float32) == per_position, TINY_SHAPES[family]


def test_datasheet_table():
    assert rl.datasheet_bandwidth("NVIDIA H200") == 4.8e12
    assert rl.datasheet_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert rl.datasheet_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert rl.datasheet_bandwidth("NVIDIA A100-SXM4-80GB") == 2.039e12
    assert rl.datasheet_bandwidth("Intel(R) Data Center GPU Max 1550") == 3.2768e12
    assert rl.datasheet_bandwidth("NVIDIA GeForce RTX 4090") is None


def test_bad_override_raises_user_error(monkeypatch):
    monkeypatch.setenv(rl.OVERRIDE_ENV, "nan")
    with pytest.raises(UserError):
        rl.device_bandwidth(CPU)


def test_roofline_table_script(tmp_path, tiny_llama):
    """benchmarks/roofline.py end to end on a tiny model: the CPU kind on top, one row per case with its roofline."""
    env = {**os.environ, rl.OVERRIDE_ENV: "10"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "roofline.py"), "-m", str(tiny_llama),
           "--schemes", "fp32,fp16,int8", "--backends", "eager", "--num-iter", "1", "--num-warmup", "0",
           "--max-new-tokens", "4", "--no-anchor", "--no-lock"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"CPU: {cpu_kind().describe()}; ")
    assert f"read bandwidth: 10.0 GB/s ({rl.OVERRIDE_ENV}" in lines[1]
    header = next(i for i, line in enumerate(lines) if line.startswith("backend"))
    end = lines.index("", header) if "" in lines[header:] else len(lines)
    rows = [line.split() for line in lines[header + 1:end]]
    assert [(r[0], r[1], r[2]) for r in rows] == [("eager", "fp32", "float32"), ("eager", "fp16", "float16"),
                                                  ("eager", "int8", "bfloat16")]
    if last_level_cache_bytes():  # a tiny model's steps fit in it: the note after the table names every row
        assert lines[-1].endswith("last-level cache holds, so parts may come from cache and beat the roofline drawn "
                                  "from memory bandwidth: eager fp32, eager fp16, eager int8")
    for r in rows:
        ms, roofline_ms, share, run_share, place_share = float(r[3]), float(r[4]), r[5], r[6], r[7]
        read_mb = float(r[8])
        assert roofline_ms == pytest.approx(read_mb / 10, rel=0.01, abs=0.01)
        # both figures are printed to 0.01 ms, so the share is checked against the interval their rounding allows
        low = (roofline_ms - 0.005) / (ms + 0.005) * 100
        high = (roofline_ms + 0.005) / (ms - 0.005) * 100
        assert share.endswith("%") and round(low) <= int(share[:-1]) <= round(high), (share, low, high)
        assert run_share == place_share == "-"  # a bandwidth set by the user: nothing measured during the run
    fp32_mb, fp16_mb, int8_mb = (float(r[8]) for r in rows)
    assert int8_mb < fp16_mb < fp32_mb  # fp16 weights in half of fp32's bytes, int8 in a quarter


def test_roofline_table_shows_the_share_of_the_bandwidth_measured_during_the_run(capsys):
    """Against the best bandwidth seen (20 GB/s) a 10 ms step reading 100 MB is at 50%; against the 12.5 GB/s a shared
    host gave during the run, at 80%; against the best read with the CPUs placed as after the case (11 GB/s), 91%."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from roofline import print_table

    row = {"backend": "compile", "scheme": "bf16", "dtype": "bfloat16", "next_ms": 10.0, "bytes_read": 100e6,
           "cores_share": 0.734, "placement_ns": [61.4, 304.6], "place_gb_s": 11.0}
    print_table([row], 20.0, 12.5)
    header, line = capsys.readouterr().out.strip().splitlines()
    assert "% of run bw % of place bw" in header and header.endswith("cores %   CPUs ns")
    assert line.split()[3:8] == ["10.00", "5.00", "50%", "80%", "91%"]
    assert line.split()[-2] == "73%"  # the cores' speed right after the case, against the host's best
    assert line.split()[-1] == "61/305"  # a cache line's round trip between two CPUs before / after the case


def test_roofline_table_prints_ratios_with_where_the_cpus_sat():
    """Ours against llama.cpp (the best 16-bit row against F16, INT4 against Q4_1) and INT8 against 16 bits; rows
    timed in another placement of the CPUs say so, with the ratio at each placement's best bandwidth."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from roofline import ratio_lines

    def row(backend, scheme, ms, ns, gb_s):
        return {"backend": backend, "scheme": scheme, "next_ms": ms, "placement_ns": ns, "place_gb_s": gb_s}

    rows = [row("compile", "bf16", 9.0, [60.0, 62.0], 33.0), row("compile", "fp16", 9.5, [61.0, 60.0], 33.0),
            row("compile", "int8", 6.0, [300.0, 310.0], 60.0), row("compile", "int4", 4.0, [60.0, 58.0], 33.0),
            {"backend": "llama.cpp", "scheme": "Q4_1", "error": "did not run (see above)"},
            row("llama.cpp", "F16", 10.0, [58.0, 64.0], 33.0)]
    assert ratio_lines(rows) == [
        "compile bf16 9.00 ms / llama.cpp F16 10.00 ms = 0.90x the time (the CPUs placed alike for both: 62 / 64 ns)",
        "compile int8 6.00 ms / compile bf16 9.00 ms = 0.67x the time (the CPUs placed otherwise for the two, 300/310 "
        "against 60/62 ns; at each placement's best bandwidth, 60.0 and 33.0 GB/s: 1.21x)"]
    assert ratio_lines([rows[0]]) == []
    rows[-1]["placement_ns"] = [58.0, 313.0]
    assert ratio_lines(rows)[0] == ("compile bf16 9.00 ms / llama.cpp F16 10.00 ms = 0.90x the time (the CPUs moved "
                                    "during llama.cpp F16: its time mixes two placements, rerun for a ratio in one)")


def test_alternate_refuses_bad_rounds_in_one_line():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "alternate.py"), "--rounds", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].endswith("--rounds must be at least 1")


@pytest.mark.parametrize("script", ["roofline.py", "woq.py"])
def test_benchmark_scripts_refuse_unknown_schemes(script):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--schemes", "bf16,int3"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown int3" in proc.stderr and "Traceback" not in proc.stderr


def test_llama_cpp_rows_count_the_gguf_tensor_bytes():
    """Q4_1 stores 4-bit weights with an fp16 scale and minimum per 32 (5 bits a weight), some tensors in more bits."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from roofline import gguf_bytes_read

    from llmbench.models import default_gguf_path

    path = default_gguf_path()
    read = gguf_bytes_read(path)
    assert 134_515_008 * 5 / 8 <= read < path.stat().st_size
