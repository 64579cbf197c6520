"""How the compile backend's kernel linears (llmbench/backends/cpu_kernels.py) choose, call by call, between the
suite's CPU kernels and the module's own F.linear: decode steps, prompts (eagerly or compiled) and accuracy scoring."""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn.functional as F

from llmbench.backends.compile_settings import DENSE_CALL_MAX_ROWS, amx_large_rows, emulated_gemm
from llmbench.backends.compile_settings import KERNEL_MAX_ROWS as MAX_ROWS

QUANTIZED = ("int8", "int4")  # kinds whose tensors are the kernels' own copies (plain weights are the module's)

# Prompts (tokens x batch) up to which the INT4 and INT8 kernels serve the prefill (and decode steps of more than
# MAX_ROWS rows) instead of TorchAO's F.linear, QUANTIZED_CHUNK rows a call, each call reading the weights once and
# taking 8 rows of x per pass over each tile while it is in cache. On a 2-core AMX Xeon (default model, bf16, first
# token, alternating processes, 2026-12-05): INT4 faster at every length tried (aten's INT4 kernel is compute-bound:
# 512 rows 593 against 994 ms, 1800 rows 2178 against 3323). INT8, before its tiles (a pass per block of 4 weight
# rows), up to 64 rows (TorchAO 145 against 159 ms at 96 rows, 151 against 189 at 128); its tiles took 0.54x that
# kernel's time at 64 rows (benchmarks/cpu_kernels.py --int8) and, on a 2-core AVX-512 EPYC, 107/112 against
# TorchAO's 130/130 ms at 128 rows, a tie at 512 (487/604 against 491/483), hence 128. The 16-row INT8 tiles of
# AVX-512 VNNI builds went further on a CPU without AMX (2-core family 26 EPYC, 2026-12-07): 256 rows 100-123
# against TorchAO's 152-156 ms, 512 rows 298/298 against 307/323, 1024 a tie (670/597 against 615/693), hence 512
# there; AMX CPUs, whose bf16 GEMMs TorchAO's prompts use, keep 128.
def quantized_prefill_rows(kind: str) -> int:
    """The longest prompt (rows of x) that the `kind` ("int4" or "int8") kernels serve on this host."""
    if kind == "int4":
        return sys.maxsize
    from llmbench.host import cpu_kind

    wide = torch.ops.llmbench_cpu.int8_tile_rows() == 16 and "amx_bf16" not in cpu_kind().flags
    return 512 if wide else 128


QUANTIZED_CHUNK = 256  # rows of x a call (its copies of x held per call; 1024 was no faster at 1024 rows of INT4)


class KernelCall:
    """One op call over the weights of one linear or of a group of `members` siblings: `call(x)` gives the whole
    output. Inside a compiled step every member calls it with the same input and compile_settings.dedupe_pass keeps
    one call; outside (`rows_at_once`: prefills, accuracy scoring) the first member's call serves the others, and
    the output is let go once every member has had it. Calls of up to `large_rows` rows outside decode steps of up
    to MAX_ROWS (prefills; bf16 on AMX tiles: larger steps too) take the kernel, `chunk` rows at a time, where the
    input has `dtype` (None: any); with `widen`, larger calls take F.linear in float32."""

    def __init__(self, call, members: int = 1, large_rows: int = 0, chunk: int = MAX_ROWS,
                 dtype: torch.dtype | None = None, widen: bool = False):
        self.call, self.members, self.large_rows, self.chunk = call, members, large_rows, chunk
        self.dtype, self.widen = dtype, widen
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        self._served = 0

    def large(self, x: torch.Tensor) -> int:
        return self.large_rows if self.dtype in (None, x.dtype) else 0

    def rows_at_once(self, x: torch.Tensor, chunk: int) -> torch.Tensor:
        if self._last is None or self._last[0] is not x:
            rows = x.numel() // x.shape[-1]
            flat = x.reshape(rows, x.shape[-1]).contiguous()
            out = torch.cat([self.call(part) for part in flat.split(chunk)]) if rows > chunk else self.call(flat)
            self._last, self._served = (x, out.reshape(*x.shape[:-1], out.shape[-1])), 0
        out = self._last[1]
        self._served += 1
        if self._served == self.members:
            self._last = None
        return out


# Prompts of a 16-bit kind whose GEMM torch emulates that the 512-bit kernels take, in calls of DENSE_CALL_MAX_ROWS
# rows (each reading the weights once, 8 rows a pass over each block; compiled prompts up to one call): fp16 on the
# family 26 EPYC (no avx512_fp16), one prefill's linears of the default model, 32 / 64 / 128 / 256 rows 31 / 66 / 130
# / 256 ms (calls of 32) against F.linear in float32's 84 / 175 / 273 / 446 (weights widened per call); whole compile
# fp16 first tokens at 64 tokens 74-76 ms in calls of 32 (the prompt eager), 62-63 in one (compiled). AVX2 builds keep
# one call of up to MAX_ROWS (float32 beyond): on the AMX Xeon built for AVX2 alone, 32 rows of bf16 took the kernels
# 78 ms in 8-row calls, float32 68.
EMULATED_WIDE_ROWS = 256


def emulated_prompt_rows() -> tuple[int, int]:
    """(the most rows, rows a call) of the prompts of a 16-bit kind whose GEMM torch emulates that the loaded kernels
    take."""
    wide = torch.ops.llmbench_cpu.wide_dense_built()
    return (EMULATED_WIDE_ROWS, DENSE_CALL_MAX_ROWS) if wide else (MAX_ROWS, MAX_ROWS)


# Prompts of a kind torch multiplies natively that the kernels take instead, where its library GEMM is slow at few
# rows: (the most rows, rows a call; compiled prompts up to one call). One prefill's linears of the default model on
# the 2-core family 26 EPYC, kernels / library best time (`benchmarks/cpu_kernels.py --prefill [--dtype float32]`),
# 8 / 16 / 32 / 64 / 128 / 256 rows:
# - bf16 on CPUs with avx512_bf16 and no AMX (the kernels' vdpbf16ps against oneDNN's avx512_bf16 GEMM): 0.36 / 0.53
#   / 0.68 / 0.81 / 1.08 / 1.36, hence 64 (one call of 64 rows as fast as two of 32).
# - float32 on AMD CPUs (512-bit kernels against MKL's sgemm): 0.27 / 0.41 / 0.48 / 0.50 / 0.58 / 0.66 (1024 rows,
#   with the output head: 0.72), hence any length.
NATIVE_PROMPT_ROWS = {"bfloat16": (DENSE_CALL_MAX_ROWS, DENSE_CALL_MAX_ROWS),
                      "float32": (sys.maxsize, DENSE_CALL_MAX_ROWS)}


def native_prompt_kinds() -> list[str]:
    """The kinds of NATIVE_PROMPT_ROWS whose prompts the loaded kernels take on this CPU: bf16 where they multiply it
    by vdpbf16ps (AVX-512 builds on CPUs with avx512_bf16) and the CPU has no AMX, float32 on AMD CPUs with the
    512-bit kernels."""
    from llmbench.host import cpu_kind

    cpu, wide = cpu_kind(), torch.ops.llmbench_cpu.wide_dense_built()
    return [kind for kind, takes in (("bfloat16", "avx512_bf16" in cpu.flags and "amx_bf16" not in cpu.flags),
                                     ("float32", cpu.amd)) if wide and takes]


def native_prompt_rows(kind: str, weight: torch.Tensor) -> tuple[int, int] | None:
    """NATIVE_PROMPT_ROWS[kind] where native_prompt_kinds() has it and the weight's input size suits the kernel
    (bf16's vdpbf16ps: a multiple of 32, else 16), else None."""
    if kind not in native_prompt_kinds() or weight.shape[1] % (32 if kind == "bfloat16" else 16):
        return None
    return NATIVE_PROMPT_ROWS[kind]


def kernel_of(call, kind: str, weight: torch.Tensor, members: int = 1) -> KernelCall:
    """The KernelCall of `kind` weights: bf16 on AMX tiles (amx_large_rows) in one call of up to 64 rows; INT4 and
    INT8 prompts of up to quantized_prefill_rows(kind) in calls of QUANTIZED_CHUNK; 16-bit kinds whose GEMM torch
    emulates here (emulated_gemm) as emulated_prompt_rows() says (up to EMULATED_WIDE_ROWS in calls of 64 rows
    where the kernels are built with AVX-512, else one call of up to MAX_ROWS), larger ones in float32; kinds
    torch multiplies natively as native_prompt_rows() says; other kinds in decode steps only."""
    if kind in QUANTIZED:
        return KernelCall(call, members, quantized_prefill_rows(kind), QUANTIZED_CHUNK)
    tiles = amx_large_rows(kind, weight)
    if not tiles and emulated_gemm(kind):
        return KernelCall(call, members, *emulated_prompt_rows(), widen=True)
    native = None if tiles else native_prompt_rows(kind, weight)
    if native:
        return KernelCall(call, members, *native, getattr(torch, kind))
    return KernelCall(call, members, tiles, tiles or MAX_ROWS, torch.bfloat16)


_PROMPT = [False]  # set while a prompt's pass is traced for torch.compile (prompt_pass)


@contextlib.contextmanager
def prompt_pass():
    """Around a compiled prompt's pass (of at most prompt_rows(model) rows): its linears choose as an eager
    prompt's do (the kernel where it takes the rows in one call, else F.linear), not as a decode step's. Read while
    dynamo traces, so each graph keeps the choice it was traced with (and guards on it)."""
    _PROMPT[0] = True
    try:
        yield
    finally:
        _PROMPT[0] = False


class KernelLinearForward:
    """A replacement forward for one nn.Linear: its kernel (its columns `part` of a group's output) for compiled
    steps of at most `max_rows` rows and for the larger calls the kernel takes (KernelCall.large_rows); while
    `scoring` (accuracy runs score the decode step's numerics) for everything, in chunks; else the module's own
    F.linear (library or TorchAO kernel)."""

    def __init__(self, module: torch.nn.Linear, max_rows: int, kernel: KernelCall, one_row=None,
                 part: tuple[int, int] | None = None):
        self.module, self.max_rows, self.kernel, self.one_row, self.part = module, max_rows, kernel, one_row, part
        self.scoring = False

    def _mine(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.part is None else out.narrow(-1, self.part[0], self.part[1])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        large = self.kernel.large(x)
        compiling = torch.compiler.is_compiling()
        if compiling and not _PROMPT[0]:  # a decode step
            if rows == 1 and self.one_row is not None:
                return self.one_row(x, self.module.weight, self.module.bias)
            if rows <= self.max_rows or rows <= min(large, self.kernel.chunk):  # one kernel call in the graph
                return self._mine(self.kernel.call(x))
            return F.linear(x, self.module.weight, self.module.bias)
        if compiling and rows <= min(large, self.kernel.chunk):  # a compiled prompt, as an eager one: the kernel
            return self._mine(self.kernel.call(x))  # (the members' identical calls: one kept, as in steps)
        if not compiling and (rows <= large or self.scoring):
            return self._mine(self.kernel.rows_at_once(x, self.kernel.chunk if large else MAX_ROWS))
        if self.kernel.widen:
            bias = self.module.bias if self.module.bias is None else self.module.bias.float()
            return F.linear(x.float(), self.module.weight.float(), bias).to(x.dtype)
        return F.linear(x, self.module.weight, self.module.bias)


def _kernel_forwards(model: torch.nn.Module) -> list[KernelLinearForward]:
    return [m.forward for m in model.modules() if isinstance(vars(m).get("forward"), KernelLinearForward)]


def prompt_rows(model: torch.nn.Module, most: int) -> int:
    """The longest prompt (tokens x batch, at most `most`) that each kernel linear of `model` either takes in one
    call or leaves to F.linear: a compiled prompt's limit (longer ones would split their rows per sibling)."""
    return min([most] + [f.kernel.chunk for f in _kernel_forwards(model) if f.kernel.large_rows])


def score_with_kernels(model: torch.nn.Module) -> bool:
    """Route every kernel linear of `model` through its kernel outside compiled steps too; -> whether any."""
    forwards = _kernel_forwards(model)
    for forward in forwards:
        forward.scoring = True
    return bool(forwards)
