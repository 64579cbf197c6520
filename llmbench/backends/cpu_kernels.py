"""Weight-streaming linear kernels for decode steps on CPUs (`llmbench/backends/cpu_gemv.cpp`).

Built once per host with the host's own instruction set (`-march=native`: AVX2 code on an AVX2 EPYC, AVX-512 code
where the CPU has it) into `$LLMBENCH_CACHE/kernels/`, loaded as torch ops (`torch.ops.llmbench_cpu.linear_dense /
linear_int8(_tiles) / linear_int4`) that torch.compile calls from inside the compiled decode step. They serve steps
of at most compile_settings.STEP_MAX_ROWS rows (batch x beams; MAX_ROWS of them per pass over a block of weights,
while it is in cache): every weight read once from memory per step, with independent accumulators per weight row,
so the step streams weights near the memory bandwidth where aten's GEMV reaches about half of it and its INT4 kernel
is compute-bound. They serve prefills too where they beat the library (KernelCall): INT4 and INT8 prompts (each
tile or block taken 8 rows of x at a time while in cache), and on AMX CPUs bf16 prompts and steps of up to 64 rows.

Weights: float32, bfloat16 and float16 as stored (bf16 steps of several rows on AMX tiles where the CPU has them);
TorchAO INT8 weight-only (float scale per row or group) copied once into tiles of 8 rows, 16 on AVX-512 VNNI builds
(int8_tiles; as stored where tiles do not fit); TorchAO's CPU INT4 (`Int4OpaqueTensor`) repacked once into tiles of
the same sizes (`int4_layout.py`): exactly the same values, interleaved so that the vector lanes are the rows.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import torch

from llmbench.backends import int4_layout
from llmbench.backends.compile_settings import KERNEL_MAX_ROWS, amx_min_rows_env
from llmbench.backends.generated_kernels import plain_weight
from llmbench.backends.huge_pages import HugePageArena
from llmbench.backends.kernel_linears import (  # noqa: F401 - QUANTIZED_*: part of this module's face
    QUANTIZED,
    QUANTIZED_CHUNK,
    KernelCall,
    KernelLinearForward,
    kernel_of,
    quantized_prefill_rows,
    score_with_kernels,
)
from llmbench.backends.ops_build import build
from llmbench.errors import UserError
from llmbench.host import cpu_kind

SOURCE = Path(__file__).with_name("cpu_gemv.cpp")
ATTENTION_SOURCE = SOURCE.with_name("cpu_attention.cpp")  # decode attention, built into the same library
MAX_ROWS = KERNEL_MAX_ROWS  # rows of x a pass (cpu_gemv.cpp's kMaxRows)
_lock = threading.Lock()
_state: dict[str, object] = {}


def prefetch_hint() -> str:
    """Which software prefetch the kernels issue for weight rows a few blocks ahead, per CPU vendor (docs/measured.md
    has every figure): "t0, tiles t2" (rows to every cache level, the INT4 and INT8 tiles to the last, two tiles
    ahead) on Intel CPUs (a 2-core AMX Xeon: prefetchnta left a step's INT4 weights at 6.7 GB/s, prefetcht0 at 10.0;
    INT4 tiles with t2 0.87x the time of t0). "t2, next pass t0, tiles nta 1 ahead" on AMD ones: rows to the outer
    levels (a family 25 EPYC, one step's bf16 linears: nta 11.79 ms, t2 8.39, t0 11.69), the tiles non-temporal one
    tile ahead, INT4's 16-row tiles to the outer levels (nta: 1.12-1.28x the time), and the 512-bit kernel of 5-8
    rows its next pass's rows into L1 (family 26: 0.77x). From family 26 on, INT4's 16-row tiles to every level
    ("16-row INT4 tiles t0": one step's INT4 linears 0.90-0.99x the time of t2, greedy runs 1.66 / 1.79 ms/token)."""
    if not cpu_kind().amd:
        return "t0, tiles t2"
    return AMD_HINT + (", 16-row INT4 tiles t0" if _amd_family() >= 26 else "")


def _amd_family() -> int:
    """The AMD CPU's family (25: Zen 3 and 4, 26: Zen 5), 0 where /proc/cpuinfo does not say."""
    return int(next(iter(cpu_kind().generation.split()[1:2]), 0))  # generation: "family F model M"


def half_stream_rows() -> int | None:
    """Up to how many rows of x the 512-bit fp16 kernel reads a thread's share as one stream (the weight rows one
    after another); more rows read four weight rows side by side. 2 on AMD CPUs from family 26: there, at 3 / 4 rows
    side by side took 0.72 / 0.74x the time of streams (one step's linears, benchmarks/kernel_builds.py) and whole
    fp16 beam-4 runs 5.33-5.39 against 7.38-7.49 ms/token. None elsewhere: as bf16 and float32, whose streams stay
    ahead to 4 rows on family 26 (side by side bf16 1.23-1.27x, float32 1.00x) and fp16's on family 25 (0.92-0.95x)."""
    return 2 if cpu_kind().amd and _amd_family() >= 26 else None


def dense_one_row_kernels(dtype: torch.dtype) -> bool:
    """Whether one-row steps of plain `dtype` weights run these kernels (else inductor's generated reductions), per
    CPU vendor and build as measured with the two forms compiled side by side in one process (benchmarks/
    cpu_kernels.py --step, kernels/reductions time, best and median of 10-20 alternating generations): on a 2-core
    AMX Xeon the kernels took 0.89x the reductions' time in bf16 (23.6 vs 26.5 ms/token) and 0.98x in fp32, so
    Intel CPUs take the kernels. AMD CPUs, a 2-core AVX-512 EPYC, since their kernels read a one-row call's rows as
    one stream per thread (schedule(), 2026-12-06): the AVX-512 build bf16 0.94 / 0.955 (whole runs, alternating
    processes: 0.86-1.03x, median 0.955x), fp16 1.00 / 1.02 (whole runs 0.98-1.24x), float32 1.28 / 1.28; built as
    for an AVX2-only CPU (-mno-avx512f, ATEN_CPU_CAPABILITY=avx2) bf16 0.875 / 0.87, fp16 0.89 / 0.89. So AMD CPUs
    take the kernels for bf16 weights, for fp16 ones where built without AVX-512, and keep the reductions for
    float32 (the dtype AVX2 CPUs default to; 1.03 / 1.09 in AVX2 code). Once the 512-bit one-row kernels kept their
    two accumulators in registers (cpu_gemv_avx512.h's two_chains): bf16 0.929 / 0.906, fp16 0.996 / 0.965 and
    1.044 / 1.038 (a tie), float32 1.012 / 1.014 (a tie). Family 26 model 2 (2026-12-07): float32 0.922 / 0.917,
    bf16 0.781 / 0.778, fp16 0.994 / 0.998 (with jemalloc 0.91x, whole runs): so AMD CPUs take them for float32 built
    with AVX-512, fp16 from family 26 on. LLMBENCH_ONE_ROW_DENSE=kernels or reductions overrides. Needs load()."""
    forced = os.environ.get("LLMBENCH_ONE_ROW_DENSE")
    if forced not in (None, "", "kernels", "reductions"):
        raise UserError(f"LLMBENCH_ONE_ROW_DENSE={forced!r}: use kernels or reductions")
    if forced:
        return forced == "kernels"
    if not cpu_kind().amd:
        return True
    if dtype == torch.float16:
        return not wide_build() or _amd_family() >= 26
    if dtype == torch.float32:
        return wide_build()
    return dtype == torch.bfloat16


def wide_build() -> bool:
    """Whether the loaded kernels have the 512-bit paths (built for an AVX-512 CPU)."""
    return bool(torch.ops.llmbench_cpu.wide_dense_built())


def attention_vectorized() -> bool:
    """Whether the kernels are loaded (not turned off) with decode_attention's vector path (cpu_attention.cpp)."""
    off = os.environ.get("LLMBENCH_CPU_KERNELS") == "0" or _state.get("error", "not loaded") is not None
    return not off and torch.ops.llmbench_cpu.attention_vectorized()


# The build's -D flags per prefetch_hint() (__builtin_prefetch's locality: 0 nta, 1 t2, 3 t0)
AMD_HINT = "t2, next pass t0, tiles nta 1 ahead"
AMD_FLAGS = [f"-DLLMBENCH_{f}" for f in ("PREFETCH_LOCALITY=1", "TILE_PREFETCH_LOCALITY=0",
                                         "WIDE_TILE_PREFETCH_LOCALITY=1", "PREFETCH_TILES=1", "NEXT_PASS_PREFETCH=1")]
PREFETCH_FLAGS = {AMD_HINT: AMD_FLAGS, AMD_HINT + ", 16-row INT4 tiles t0": [
    f.replace("WIDE_TILE_PREFETCH_LOCALITY=1", "WIDE_TILE_PREFETCH_LOCALITY=3") for f in AMD_FLAGS],
    "t0, tiles t2": ["-DLLMBENCH_PREFETCH_LOCALITY=3", "-DLLMBENCH_TILE_PREFETCH_LOCALITY=1"]}


def schedule() -> str:
    """How the kernels share a decode step's call between threads, per CPU vendor: calls of up to 8 rows of x in one
    even share per thread (larger calls in guided chunks, each half the claimant's share of what is left), and on AMD
    CPUs one to four rows of x read a share's weight rows one after another, one stream (elsewhere four weight rows
    side by side). On a 2-core AVX-512 EPYC (2026-12-06, whole compiled greedy runs, alternating processes, against
    guided chunks): INT4 0.81-0.89x the time (4 pairs), INT8 0.88-0.97x, bf16 batch 4 0.90-0.96x, INT4 beam 4
    0.66-1.18x; AVX2 code bf16 one row as streams 0.78-1.02x. On a 2-vCPU AMX Xeon (family 6 model 167, 2026-12-08;
    an earlier build there had favoured guided chunks, 0.94x): even shares, one step's linears in one process
    alternating with guided chunks (benchmarks/kernel_builds.py), 0.93-0.98x the time for every kind at 1 and 4 rows
    (bf16 AMX tiles at 8 rows 1.02x), whole greedy runs bf16 11.82 / 11.93 -> 11.34 / 11.07 ms/token, INT4 3.85 /
    3.63 -> 3.12 / 3.26; one-row streams there 1.27x (bf16), 1.12x (fp16), 1.09x (float32)."""
    return "even shares, one-row streams" if cpu_kind().amd else "even shares"


EVEN_SHARES = ["-DLLMBENCH_EVEN_SPLIT_ROWS=8"]
SCHEDULE_FLAGS = {"even shares": EVEN_SHARES,
                  "even shares, one-row streams": [*EVEN_SHARES, "-DLLMBENCH_ONE_ROW_STREAMS=1"]}


def build_flags() -> list[str]:
    """The build's -D flags for this CPU kind (prefetch_hint, schedule, half_stream_rows)."""
    streams = [f"-DLLMBENCH_HALF_STREAM_ROWS={rows}"] if (rows := half_stream_rows()) else []
    return [*PREFETCH_FLAGS[prefetch_hint()], *SCHEDULE_FLAGS[schedule()], *streams]


def load() -> str | None:
    """Build (once per host and source) and load the kernels; -> None when loaded, else why they are unavailable
    (no C++ compiler, a build error): callers then keep inductor's generated reductions."""
    with _lock:
        if "error" in _state:
            return _state["error"]  # type: ignore[return-value]
        _state["error"] = _load()
        return _state["error"]  # type: ignore[return-value]


def _load() -> str | None:
    if sys.platform != "linux":
        return f"built only on linux, not {sys.platform}"
    amx_min_rows_env()  # a bad value stops here, in one line
    why = build("llmbench_cpu_gemv", [SOURCE, ATTENTION_SOURCE], host_flags(),
                f"the CPU decode kernels for {cpu_kind().describe()}", share_symbols=True)
    if why:  # a missing compiler or ninja, a build error: the caller falls back and records why
        return f"the CPU decode kernels could not be built ({why})"
    _register_fakes()
    return None


def host_flags() -> list[str]:
    """The flags of this host's build: build_flags(), then LLMBENCH_CPU_KERNEL_FLAGS."""
    return [*build_flags(), *os.environ.get("LLMBENCH_CPU_KERNEL_FLAGS", "").split()]


def _register_fakes() -> None:
    """Output shapes for torch.compile's tracing (the ops allocate their own outputs)."""
    def out_like(x: torch.Tensor, n: int) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], n))

    def linear(rows: int, x: torch.Tensor, act: int) -> torch.Tensor:  # act 1: silu(first half) * second half
        return out_like(x, rows // 2 if act else rows)

    torch.library.register_fake("llmbench_cpu::linear_dense")(
        lambda x, weight, bias, act=0: linear(weight.shape[0], x, act))
    torch.library.register_fake("llmbench_cpu::linear_int8")(
        lambda x, qdata, scale, bias, act=0: linear(qdata.shape[0], x, act))
    torch.library.register_fake("llmbench_cpu::linear_int8_tiles")(
        lambda x, packed, groups, bias, act=0: linear(packed.shape[0], x, act))
    torch.library.register_fake("llmbench_cpu::linear_int4")(
        lambda x, packed, group_size, value_bytes, bias, act=0: linear(packed.shape[0], x, act))
    torch.library.register_fake("llmbench_cpu::argmax_rows")(
        lambda scores, bias: scores.new_empty((scores.shape[0], 1), dtype=torch.long))
    torch.library.register_fake("llmbench_cpu::decode_attention")(
        lambda query, key, value, mask, scale: query.new_empty((query.shape[0], 1, query.shape[1], query.shape[3])))


def quantized_activations(kind: str) -> str:
    """How the INT4 or INT8 kernel treats activations on this host (the kernels' AVX2 branch follows
    -march=native; INT8 weights in groups of other than a multiple of 32 values keep float32 activations)."""
    flags = cpu_kind().flags
    if "avx2" in flags:
        vnni = "avx512_vnni" in flags or "avx_vnni" in flags
        groups = " (weight groups of a multiple of 32; float32 otherwise)" if kind == "int8" else ""
        return f"int8 per 32 values, integer dot products ({'VNNI' if vnni else 'AVX2'}){groups}"
    return "float32"


def _int8_parts(weight) -> tuple[torch.Tensor, torch.Tensor] | None:
    from llmbench.backends.generated_kernels import _int8_parts as parts

    found = parts(weight)
    if found is None or found[0].shape[1] % found[1].shape[1] or (found[0].shape[1] // found[1].shape[1]) % 8:
        return None
    return found[0].contiguous(), found[1].float().contiguous()


def int8_tiles_take(qdata: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether an int8 weight runs as tiles (int8_tiles, linear_int8_tiles; else as stored, linear_int8): whole tiles
    of 8 rows, groups of a multiple of 32 weights, an AVX2 build, LLMBENCH_INT8_TILES not 0. A step's int8 linears,
    default model, 2-core AVX-512 EPYC (benchmarks/cpu_kernels.py --int8 --rounds 20), 8-row tiles against as stored,
    best ms: 1 row 4.40 / 4.64 (0.95x), 8 rows 7.87 / 12.50, 64 rows 45.75 / 80.08 (0.57x)."""
    return (os.environ.get("LLMBENCH_INT8_TILES") != "0" and qdata.shape[0] % 8 == 0
            and (qdata.shape[1] // scale.shape[1]) % 32 == 0 and torch.ops.llmbench_cpu.int8_tiles_built())


def int8_tiles(qdata: torch.Tensor, scale: torch.Tensor, tile_rows: int | None = None) -> torch.Tensor:
    """TorchAO's int8 weight (N, K) and its float scales (N, groups) as linear_int8_tiles reads them, (N, 4 * groups
    + K) uint8 (a copy beside TorchAO's, which the eager prefill keeps using): tiles of tile_rows rows (the build's
    int8_tile_rows(): 16 on AVX-512 VNNI, else 8; the last 8 where N is an odd multiple of 8), each the tile's scales
    as [group][row] (float32), then per 32 weights eight vectors whose 4-byte lane r holds four of row r's weights."""
    (n, k), groups, rows = qdata.shape, scale.shape[1], tile_rows or torch.ops.llmbench_cpu.int8_tile_rows()
    wide, parts = n // rows * rows, []
    for q, s, t in ((qdata[:wide], scale[:wide], rows), (qdata[wide:], scale[wide:], 8)):  # either may be empty
        weights = q.reshape(-1, t, k // 32, 8, 4).permute(0, 2, 3, 1, 4).reshape(-1, t * k).view(torch.uint8)
        scales = s.float().reshape(-1, t, groups).transpose(1, 2).contiguous().reshape(-1, t * groups).view(torch.uint8)
        parts.append(torch.cat([scales, weights], dim=1).reshape(-1, 4 * groups + k))
    return torch.cat(parts)


SCORED_WITH = "eager+cpu_kernels"  # an accuracy record's scored_with when its linears ran these kernels
# Sibling linears that read the same input (attention's q/k/v, the MLP's gate/up): one kernel call over their
# concatenated weights serves all of them (fewer calls per step, each with more rows to share out among threads).
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _frozen(tensor: torch.Tensor) -> torch.nn.Parameter:
    """A kernel's own copy of a weight as a Parameter without gradient: once a step is compiled and its guards are
    skipped, dynamo still checks every plain tensor the step reads on every call (about 4 us each on an AVX2 EPYC:
    3 ms a step for INT4's 633), but not Parameters."""
    return tensor if isinstance(tensor, torch.nn.Parameter) else torch.nn.Parameter(tensor, requires_grad=False)


def kind_of(dtype: torch.dtype) -> str:
    """The weight kind (use_kernel_linears' counts) of plain weights of this dtype: "bfloat16", ..."""
    return str(dtype).removeprefix("torch.")


class _Refused(Exception):
    """Why the kernels do not take a layer's weight."""


def kernel_parts(module: torch.nn.Linear) -> tuple[str, tuple[torch.Tensor, ...], object]:
    """-> (kind, the tensors the op reads, int4: (group size, bytes per scale or zero), else 0) for this layer's
    weight; raises _Refused, with the reason, where the kernels do not take it."""
    weight = module.weight
    if weight.shape[1] % 8:
        raise _Refused("input size not a multiple of 8")
    if plain_weight(weight):
        if not weight.is_contiguous():
            raise _Refused("non-contiguous weight")
        return kind_of(weight.dtype), (weight,), 0
    int8 = _int8_parts(weight)
    if int8 is not None:
        qdata, scale = int8
        if not int8_tiles_take(qdata, scale):
            return "int8", int8, 0
        return "int8", (int8_tiles(qdata, scale),), scale.shape[1]
    int4 = int4_layout.int4_from_torchao(weight, torch.ops.llmbench_cpu.int4_tile_rows())
    if int4 is not None:
        packed, layout = int4
        return "int4", (packed,), layout
    raise _Refused(f"{type(weight).__name__} weight")


def _op_call(kind: str, tensors: tuple[torch.Tensor, ...], layout, bias: torch.Tensor | None):
    ops = torch.ops.llmbench_cpu
    tensors = tuple(map(_frozen, tensors))
    bias = None if bias is None else _frozen(bias)
    if kind == "int8" and layout:
        packed, = tensors
        return lambda x: ops.linear_int8_tiles(x, packed, layout, bias)
    if kind == "int8":
        qdata, scale = tensors
        return lambda x: ops.linear_int8(x, qdata, scale, bias)
    if kind == "int4":
        packed, = tensors
        group_size, value_bytes = layout
        return lambda x: ops.linear_int4(x, packed, group_size, value_bytes, bias)
    weight, = tensors
    return lambda x: ops.linear_dense(x, weight, bias)


def _into(arena: HugePageArena | None, tensor: torch.Tensor | None) -> torch.Tensor | None:
    """tensor, its values moved into the arena in place (every holder of the tensor, such as the module whose
    weight it is or a TorchAO weight whose values it holds, reads the new copy; the old memory is freed)."""
    if arena is not None and tensor is not None:
        tensor.data = arena.place(tensor.detach())
    return tensor


def kernel_call(module: torch.nn.Linear, arena: HugePageArena | None = None):
    """-> (the op call for this layer's weight, kind) or (None, why not). With an arena, the tensors the op reads
    (the module's own weight and bias where plain) move into it."""
    try:
        kind, tensors, layout = kernel_parts(module)
    except _Refused as exc:
        return None, str(exc)
    tensors = tuple(_into(arena, t) for t in tensors)
    return _op_call(kind, tensors, layout, _into(arena, module.bias)), kind


def _fuse(members: list[torch.nn.Linear],
          arena: HugePageArena | None = None) -> tuple[str, KernelCall, list[tuple[int, int]]] | None:
    """One kernel call over sibling linears of the same kind, or None where they differ (kind, input size, int4
    group size, int8 groups, bias or no bias) or where an INT4 or INT8 tiles' member but the last ends in a short
    tile (16-row tiles: an odd multiple of 8 rows). Plain weights are rebound as row slices of their concatenation
    (no second copy); quantized ones are concatenated from the kernels' own copies."""
    try:
        parts = [kernel_parts(m) for m in members]
    except _Refused:
        return None
    kinds = {(kind, layout, tuple(t.shape[1:] for t in tensors)) for kind, tensors, layout in parts}
    biases = [m.bias for m in members]
    if len(kinds) != 1 or len({b is None for b in biases}) != 1:
        return None
    tile_rows = {"int4": torch.ops.llmbench_cpu.int4_tile_rows, "int8": torch.ops.llmbench_cpu.int8_tile_rows}
    if parts[0][2] and any(m.out_features % tile_rows[parts[0][0]]() for m in members[:-1]):
        return None  # the kernel takes a short tile only at the end of its rows
    kind, _, layout = parts[0]
    tensors = tuple(_into(arena, torch.cat([t.detach() for t in column])) for column in zip(*(t for _, t, _ in parts)))
    bias = None if biases[0] is None else _into(arena, torch.cat([b.detach() for b in biases]))
    spans, start = [], 0
    for m in members:
        spans.append((start, m.out_features))
        start += m.out_features
    if kind not in QUANTIZED:
        whole = tensors[0]
        for m, (begin, size) in zip(members, spans):
            m.weight = torch.nn.Parameter(whole[begin:begin + size], requires_grad=False)
    return kind, kernel_of(_op_call(kind, tensors, layout, bias), kind, tensors[0], len(members)), spans


def use_kernel_linears(model: torch.nn.Module, max_rows: int, arena: HugePageArena | None = None) -> dict[str, int]:
    """Give every nn.Linear whose weight the kernels take the kernel forward, siblings (SIBLINGS) fused into one
    call; -> counts per weight kind, of fused groups (`fused groups`), and per reason a layer was left to its own
    forward (`kept: ...`). Quantized weights and steps of 2-8 rows use the kernels; one-row steps of plain
    floating-point weights too, except where dense_one_row_kernels(dtype) says inductor's generated reductions are
    faster. With an arena, every tensor the kernels read moves into it (huge pages)."""
    from llmbench.backends.generated_kernels import _reduction_linear

    counts: dict[str, int] = {}

    def give(module: torch.nn.Linear, kind: str, kernel: KernelCall, part=None) -> None:
        reductions = kind not in QUANTIZED and not dense_one_row_kernels(module.weight.dtype)
        module.forward = KernelLinearForward(module, max_rows, kernel, _reduction_linear if reductions else None,
                                             part)
        counts[kind] = counts.get(kind, 0) + 1

    done: set[int] = set()
    for parent in model.modules():
        children = dict(parent.named_children())
        for names in SIBLINGS:
            members = [children.get(name) for name in names]
            if not all(isinstance(m, torch.nn.Linear) for m in members):
                continue
            fused = _fuse(members, arena)
            if fused is None:
                continue
            kind, kernel, spans = fused
            for member, span in zip(members, spans):
                give(member, kind, kernel, span)
                done.add(id(member))
            counts["fused groups"] = counts.get("fused groups", 0) + 1
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear) or id(module) in done:
            continue
        call, kind = kernel_call(module, arena)
        if call is None:
            kind = f"kept: {kind}"
            counts[kind] = counts.get(kind, 0) + 1
        else:
            give(module, kind, kernel_of(call, kind, module.weight))
    int4_layout.forget_nibble_orders()  # one index per weight of each shape: not kept for the run
    return counts
