"""The CPU kernels built with other instruction sets than this host's best (LLMBENCH_CPU_KERNEL_FLAGS), each in a
process of its own: the paths of CPUs without VNNI, without AVX-512 and without AVX2 give the same results, and a
build promises only the paths it has."""

import io
import os
import subprocess
import sys

import pytest
import torch

from llmbench.backends import cpu_kernels
from tests.conftest import ROOT


def run_in_build(code: str, flags: str, drop: tuple[str, ...] = (),
                 binary: bool = False) -> subprocess.CompletedProcess:
    """`python -c code` with the kernels built with `flags` (environment variables in `drop` unset); binary: its
    stdout as bytes (stderr decoded all the same)."""
    env = {**os.environ, "LLMBENCH_CPU_KERNEL_FLAGS": flags}
    for name in drop:
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=not binary,
                          check=False)
    if binary:
        proc.stderr = proc.stderr.decode(errors="replace")
    return proc


def check_in_build(code: str, flags: str) -> None:
    """`code` run (run_in_build) after the kernels built with `flags` loaded, as `ops` (torch.ops.llmbench_cpu):
    it must run to its end, its asserts holding."""
    proc = run_in_build("import torch; from llmbench.backends import cpu_kernels; assert cpu_kernels.load() is None; "
                        f"ops = torch.ops.llmbench_cpu; {code}; print('checked')", flags)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("checked"), proc.stderr[-3000:]


def test_int8_and_int4_without_vnni_give_the_same_integers():
    """The AVX2 path of CPUs without VNNI (maddubs), built on this host with LLMBENCH_NO_VNNI: the same checks."""
    check_in_build("from tests import test_cpu_kernels as t, test_cpu_kernels_int8 as t8; "
                   "t8.check_int8_integer_path(ops); "
                   "[t.test_int4_tiles_of_any_rows_of_x(ops, m, r) for m in (torch.bfloat16, torch.float32) "
                   "for r in (1, 5, 8)]", "-DLLMBENCH_NO_VNNI")


def test_a_build_without_avx512_promises_no_amx_tiles():
    """Built as for an AVX2 CPU (LLMBENCH_CPU_KERNEL_FLAGS=-mno-avx512f), an AMX host's kernels have no AMX path: no
    call may be routed to it (a 32-row prefill once reached linear_dense and failed), and the record says why. Its
    dense paths (bf16 and fp16 16 weights a step, one row as a stream per thread, the generic loops) equal F.linear
    as the host's own build does, for weights of fewer rows than the threads' share too."""
    code = ("import torch; from llmbench.backends import cpu_kernels, compile_settings as c; "
            "assert cpu_kernels.load() is None; ops = torch.ops.llmbench_cpu; assert not cpu_kernels.wide_build(); "
            "from tests.test_cpu_kernels import test_dense_equals_linear as dense; "
            "[dense(ops, d, r, k) for d in (torch.float32, torch.bfloat16, torch.float16) for r in (1, 3, 8) "
            "for k in (64, 72, 80)]; "
            "[dense(ops, d, 1, 64, n) for d in (torch.bfloat16, torch.float16) for n in (1, 3, 5)]; "
            "assert ops.amx_rows_from() == 0 and ops.amx_max_rows() == 0 and c.amx_max_rows() == 0; "
            "w = torch.randn(64, 256, dtype=torch.bfloat16); x = torch.randn(3, 256, dtype=torch.bfloat16); "
            "ref = (x.float() @ w.float().T); assert torch.allclose(ops.linear_dense(x, w, None).float(), ref, "
            "rtol=2e-2, atol=2e-2); print(c.amx_description())")
    proc = run_in_build(code, "-mno-avx512f", drop=("LLMBENCH_AMX_MIN_ROWS",))
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stdout.strip().splitlines()[-1]
    if "amx_bf16" not in cpu_kernels.cpu_kind().flags:
        assert said == "None"
    else:
        assert "without AVX512_BF16" in said or "Linux refused" in said, said


def test_a_build_without_avx2_runs_the_portable_loops():
    """Built for an x86-64 CPU without AVX2, FMA and F16C, the kernels still build (their vector paths left out),
    and the dense and attention kernels' portable loops give the same results."""
    check_in_build("from tests import test_cpu_kernels as t; assert not ops.attention_vectorized() and not "
                   "ops.int8_tiles_built() and not ops.wide_dense_built(); [t.test_dense_equals_linear(ops, d, r, 64) "
                   "for d in (torch.float32, torch.bfloat16) for r in (1, 3)]; "
                   "[t.test_decode_attention_equals_sdpa_over_a_static_cache(ops, d, 3, 8, 2, 'bool', 64, n) "
                   "for d in (torch.float32, torch.bfloat16) for n in (40, 300)]",
                   "-mno-avx2 -mno-avx512f -mno-fma -mno-f16c")


def test_an_avx2_build_attends_as_sdpa():
    """Built as for an AVX2 CPU, decode attention's 8-float vector path (keys one position at a time, values summed
    for three query heads at once at head size 64, one at 128) equals SDPA, on one thread and in parts."""
    check_in_build("from tests import test_cpu_kernels as t; assert ops.attention_vectorized(); "
                   "[t.test_decode_attention_equals_sdpa_over_a_static_cache(ops, d, r, h, kv, 'float', dim, n) "
                   "for d in (torch.float32, torch.bfloat16, torch.float16) for r, h, kv in ((1, 9, 3), (16, 12, 2)) "
                   "for dim in (64, 128) for n in (40, 300)]", "-mno-avx512f")


def test_the_gated_act_in_builds_without_avx512_and_without_avx2():
    """act=1 (silu of the gate half times the up half, test_glu_epilogue's checks) in the AVX2 build's 8-float
    vectors and F16C roundings, and in the portable build's scalar loops."""
    code = ("from tests import test_glu_epilogue as g; "
            "[g.test_dense_act_is_silu_of_the_first_half_times_the_second(ops, d, r) "
            "for d in (torch.float32, torch.bfloat16, torch.float16) for r in (1, 3)]; g.test_int8_act(ops); "
            "g.test_act_refuses_other_values_and_halves_of_part_blocks(ops)")
    check_in_build(f"{code}; [g.test_int4_act(ops, m, 1) for m in (torch.bfloat16, torch.float32)]", "-mno-avx512f")
    check_in_build(code, "-mno-avx2 -mno-avx512f -mno-fma -mno-f16c")


@pytest.mark.parametrize("schedule", ["guided", "even shares", "even shares, one-row streams"])
def test_every_schedule_gives_the_same_results(schedule):
    """Built with each way of sharing a call between threads (guided chunks for every call; even shares per
    cpu_kernels.schedule, with one-row streams on AMD CPUs), the dense, INT4 and INT8 kernels give the same results,
    so every schedule is checked on any host."""
    flags = {"guided": ["-DLLMBENCH_EVEN_SPLIT_ROWS=0"], **cpu_kernels.SCHEDULE_FLAGS}[schedule]
    flags = " ".join(flags if "streams" in schedule else [*flags, "-DLLMBENCH_ONE_ROW_STREAMS=0"])
    check_in_build("from tests import test_cpu_kernels as t, test_cpu_kernels_int8 as t8; "
                   "[t.test_dense_equals_linear(ops, d, r, k) for d in (torch.float32, torch.bfloat16, torch.float16) "
                   "for r in (1, 3, 8) for k in (64, 72, 80)]; "
                   "[t.test_dense_equals_linear(ops, d, 1, 64, n) for d in (torch.bfloat16, torch.float16) "
                   "for n in (1, 3)]; t8.check_int8_integer_path(ops); "
                   "[t.test_int4_tiles_of_any_rows_of_x(ops, m, r) for m in (torch.bfloat16, torch.float32) "
                   "for r in (1, 5)]", flags)


def test_int4_and_int8_tiles_of_16_rows_give_exactly_the_outputs_of_tiles_of_8():
    """AVX-512 VNNI builds pack INT4 and INT8 weights in tiles of 16 rows (int4_tile_rows, int8_tile_rows); a build
    without them (LLMBENCH_NO_WIDE_TILES) takes tiles of 8. The same weights, each packed for its build, give the same
    outputs bit for bit (every output lane sums the same products in the same order), 1 to 13 rows of x, 56 rows of
    weights (a last tile of 8 in the 16-row layout), INT4 with bfloat16 and float32 scales, INT8 per row and per
    group of 64."""
    code = ("import torch, sys; from llmbench.backends import cpu_kernels, int4_layout; "
            "assert cpu_kernels.load() is None; ops = torch.ops.llmbench_cpu; torch.manual_seed(0); "
            "q = torch.randint(0, 16, (56, 192)); s = torch.rand(56, 6) / 8; z = torch.randn(56, 6) / 4; "
            "q8 = torch.randint(-128, 128, (56, 192), dtype=torch.int8); "
            "x = [torch.randn(r, 192) for r in (1, 4, 8, 13)]; out = []; "
            "[out.append(ops.linear_int4(xi, int4_layout.int4_rows(q, s.to(m), z.to(m), ops.int4_tile_rows())[0], "
            "32, m.itemsize, None)) for m in (torch.bfloat16, torch.float32) for xi in x]; "
            "[out.append(ops.linear_int8_tiles(xi, cpu_kernels.int8_tiles(q8, s[:, :g], ops.int8_tile_rows()), g, "
            "None)) for g in (1, 3) for xi in x]; "
            "torch.save((ops.int4_tile_rows(), ops.int8_tile_rows(), out), sys.stdout.buffer)")
    host = run_in_build(code, "", binary=True)
    eight = run_in_build(code, "-DLLMBENCH_NO_WIDE_TILES", binary=True)
    assert host.returncode == 0 and eight.returncode == 0, (host.stderr + eight.stderr)[-3000:]
    (*host_rows, host_out), (*eight_rows, eight_out) = (torch.load(io.BytesIO(p.stdout)) for p in (host, eight))
    wide = {"avx512f", "avx512bw", "avx512_vnni"} <= set(cpu_kernels.cpu_kind().flags)
    assert host_rows == [16 if wide else 8] * 2
    assert eight_rows == [8, 8]
    assert len(host_out) == 16 and all(torch.equal(a, b) for a, b in zip(host_out, eight_out, strict=True))


def test_two_builds_side_by_side_in_one_process(cli):
    """benchmarks/kernel_builds.py loads the host's build and another (INT4 and INT8 tiles prefetched three tiles
    ahead, and of 8 rows) as two op namespaces in one process, decode attention's too, and times them round by
    round, each build's INT4 and INT8 weights packed for its tiles: one line per kind and rows of x, the two builds'
    outputs agreeing; bad input is refused in one line."""
    proc = cli("--flags=-DLLMBENCH_PREFETCH_TILES=3 -DLLMBENCH_NO_WIDE_TILES", "--kinds", "int4,int8,bf16,attention",
               "--rows", "1,2", "--rounds", "2", script="benchmarks/kernel_builds.py", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if "other/host" in line]
    seen = [line.split()[:2] for line in lines]
    # a case whose rounds ran with the CPUs placed in two ways is printed once per placement, one line after another
    cases = [case for i, case in enumerate(seen) if i == 0 or seen[i - 1] != case]
    assert cases == [[kind, rows] for kind in ("int4", "int8", "bf16", "attention") for rows in ("1", "2")]
    assert not any("DIFFER" in line for line in lines), lines
    bad = cli("--rows", "9", script="benchmarks/kernel_builds.py")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].endswith("1 to 8 rows each (a decode step's); "
                                                                              "--rounds: at least 1")


def test_call_timeline_of_a_traced_build(cli):
    """benchmarks/call_timeline.py builds the kernels with LLMBENCH_CALL_TRACE and prints, per placement of the CPUs,
    every shape of a step's linears with its stages (medians of the calls: each call at least as long as either
    thread's share and the even end) and the step's sums; the host's build refuses to hand over notes it never
    took; bad input is refused in one line."""
    proc = cli("--kinds", "bf16", "--seconds", "2", script="benchmarks/call_timeline.py", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    heads = [i for i, line in enumerate(lines) if line.startswith("bf16, 1 row: ")]
    assert heads, proc.stdout
    for i in heads:
        rows = [line.split() for line in lines[i + 2:i + 7]]
        assert sorted((int(r[0]), int(r[2])) for r in rows) == sorted(set(default_step_shapes())), lines[i:i + 8]
        for r in rows:
            setup, fork, t0, t1, uneven, join, call, even = map(float, r[4:12])
            assert min(setup, fork, t0, t1, uneven, join) >= 0 and call >= max(t0, t1, even), r  # each call: both hold
        assert lines[i + 7].startswith("  a step (ms, medians of the rounds' sums): set-up "), lines[i + 7]
    host = subprocess.run([sys.executable, "-c", "import torch; from llmbench.backends import cpu_kernels; "
                           "assert cpu_kernels.load() is None; torch.ops.llmbench_cpu.call_trace()"],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    assert host.returncode != 0 and "built without -DLLMBENCH_CALL_TRACE=1" in host.stderr
    bad = cli("--kinds", "int3", script="benchmarks/call_timeline.py")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].endswith("a comma-separated choice of int4, "
                                                                                "int8, bf16, fp16, fp32")


def test_call_timeline_of_compiled_steps(cli):
    """call_timeline.py --step traces compiled greedy generations of the default model: per placement, the sums of a
    step's linear calls, its decode attention calls, the time between the calls by the calls around it (every pair of a
    Llama layer and the last layer's into the output head), and the three parts outside them, each a positive number
    of microseconds."""
    proc = cli("--step", "--seconds", "1", script="benchmarks/call_timeline.py", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    heads = [i for i, line in enumerate(lines) if " generations with " in line]
    assert heads and all("its 121 linear calls" in lines[i] for i in heads), proc.stdout
    for i in heads:
        assert lines[i + 1].split()[:2] == ["set-up", lines[i + 1].split()[1]] and "even end" in lines[i + 1]
        assert lines[i + 2].startswith("  its 30 decode attention calls "), lines[i + 2]
        pairs = {tuple(line.split()[:3:2]) for line in lines[i + 3:i + 9]}
        assert pairs == {("960", "attention"), ("attention", "576"), ("576", "3072"), ("3072", "576"), ("576", "960"),
                         ("576", "49152")}, pairs
        parts = lines[i + 9].split(": ", 1)[1]
        figures = [float(word) for word in parts.split() if word.replace(".", "", 1).isdigit()]
        assert parts.startswith("the step's call to its first linear") and len(figures) == 3, lines[i + 9]
        assert all(f > 0 for f in figures), lines[i + 9]


def test_a_traced_build_hands_over_its_last_calls_oldest_first():
    """More calls than the trace holds between two call_trace()s: the last 16384, oldest first, each call's stages in
    order (entry <= region <= return), its output size noted; the next call_trace() starts again."""
    check_in_build("w = torch.randn(64, 32); x = torch.randn(1, 32); ops.call_trace(); "
                   "[ops.linear_dense(x, w, None) for _ in range(20000)]; t = ops.call_trace(); "
                   "assert t.shape == (16384, 9), t.shape; assert bool((t[1:, 0] >= t[:-1, 0]).all()); "
                   "assert bool((t[:, 1] >= t[:, 0]).all() and (t[:, 6] >= t[:, 1]).all()); "
                   "assert set(t[:, 7].tolist()) == {64} and set(t[:, 8].tolist()) == {1}; "
                   "ops.linear_dense(x, w, None); assert ops.call_trace().shape == (1, 9)", "-DLLMBENCH_CALL_TRACE=1")


def default_step_shapes():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from cpu_kernels import step_shapes

    return step_shapes()
