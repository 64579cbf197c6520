"""How the compile backend compiles (backends/compiled.py): torch.compile mode and inductor options per device and
kernel choice, which kernels a step uses per CPU kind, where inductor keeps its caches, and the graph pass that keeps
one call of each fused group of kernel linears."""

from __future__ import annotations

import hashlib
import json
import os

import torch

from llmbench.errors import UserError
from llmbench.host import cpu_kind

# Per device and kernel choice: (torch.compile mode, extra inductor options). With library kernels on cpu, freezing
# prepacks the weights for oneDNN, max-autotune lets inductor pick (and generate) the GEMM kernels, the C++ wrapper
# cuts per-call overhead, and concat_linear fuses the q/k/v and gate/up projections into one GEMM each. Generated
# kernels take the C++ wrapper too: it launches the step's ~370 kernels and ops without Python in between (on an AMX
# Xeon, one process alternating generations: INT4 0.88x best / 0.90x median time, bf16 1.01x / 0.94x, same ids).
# On cuda, the compile backend captures each warmed-up shape's whole step as one CUDA graph of its own
# (direct_steps.CudaGraphStep), which removes the host's work between steps as well as launch overhead (inductor's
# CUDA graphs, `reduce-overhead`, keep dynamo's and AOT autograd's wrappers in every step: on an H200, a 7B INT4
# step took 3.40 ms against 8.62, fp16 4.47 against 4.45, two runs); coordinate descent tunes Triton kernels.
SETTINGS = {
    ("cpu", "library"): ("max-autotune-no-cudagraphs",
                         {"freezing": True, "cpp_wrapper": True, "cpp.enable_concat_linear": True}),
    ("cpu", "generated"): ("default", {"cpp_wrapper": True, "size_asserts": False, "scalar_asserts": False,
                                       "alignment_asserts": False}),
    ("cuda", "library"): ("default", {"coordinate_descent_tuning": True}),
    ("cuda", "generated"): ("default", {"coordinate_descent_tuning": True}),
    ("xpu", "library"): ("default", {}),
}
# Generated cpu kernels of fewer elements than this run on one thread (inductor's cpp.min_chunk_size, per thread, set
# to this over the threads, at least inductor's 512): a step's norms, adds and rotary over a few rows forked every
# thread for a microsecond's work each (batch 4 / beam 4 of the default model on a 2-vCPU EPYC: 0.90-0.95x the step's
# time; docs/backends.md), while a prompt's larger kernels keep every thread.
SERIAL_KERNEL_ELEMENTS = 16384
KERNEL_CHOICES = ("generated", "library")
# Rows (batch x beams) up to which a decode step's linears and attention are generated reductions. Measured on an
# AVX2 EPYC: one row streams the weights at ~85% of the read bandwidth; at 4 rows (beam 4) the single-accumulator
# reductions become latency-bound and the step was 7x slower than the library path, so more rows keep the library.
GENERATED_LINEAR_MAX_ROWS = 1
KERNEL_MAX_ROWS = 8  # rows of x the kernels take in one pass over a weight block (cpu_gemv.cpp's kMaxRows)
# Rows (batch x beams, e.g. batch 8 with beam 4) up to which a decode step's linears and attention call the suite's
# kernels: beyond KERNEL_MAX_ROWS a weight block takes the rows of x in passes of 8
# while it is in cache, still one read from memory. Before, such steps took aten's GEMM and SDPA: batch 4 with beam
# 4 (16 rows) of the default model in bf16 on a 2-core AVX-512 EPYC spent 32 ms a step in the GEMM (8 GB/s of
# weights) and 23 ms in SDPA (docs/measured.md).
STEP_MAX_ROWS = 32
DENSE_CALL_MAX_ROWS = 64  # rows of x one dense kernel call takes (cpu_gemv.cpp's kDenseMaxRows: prompts)
AMX_DEFAULT_MIN_ROWS = 3  # cpu_gemv_amx.h's default


def amx_min_rows_env() -> int | None:
    """LLMBENCH_AMX_MIN_ROWS checked (the kernels read it once per process): the fewest rows (batch x beams) of a
    step whose bf16 linears run on AMX tiles, 0 for never; None where unset. The default, 3, is measured on a
    2-core AMX Xeon (benchmarks/cpu_kernels.py --amx): one step's bf16 linears of the default model took 0.56x the
    time of the vdpbf16ps kernel at 8 rows, 0.80x at 4 and 0.79x at 3, but 0.94x at 2 rows, where whole compiled
    decode steps were 1.05-1.10x slower (and 1.07x at one row)."""
    value = os.environ.get("LLMBENCH_AMX_MIN_ROWS", "")
    if not value:
        return None
    if not value.isdigit() or int(value) > KERNEL_MAX_ROWS:
        raise UserError(f"LLMBENCH_AMX_MIN_ROWS={value!r}: use a number of rows from 1 to {KERNEL_MAX_ROWS}, or 0 "
                        "for never")
    return int(value)


def amx_max_rows() -> int:
    """The most rows one bf16 linear call runs on AMX tiles beyond decode steps of up to KERNEL_MAX_ROWS (prefills:
    prompt tokens x batch; decode steps of 9 rows or more), 0 where those keep the library's GEMM: up to 64
    (kAmxMaxRows) on a CPU and kernel build with AMX, or LLMBENCH_AMX_MAX_ROWS. On a 2-core AMX Xeon, one
    prefill's bf16 linears of the default model took 0.59x oneDNN's time at 16 rows, 0.71x at 32, 0.84x at 64, but
    1.09x at 128 (benchmarks/cpu_kernels.py --prefill, oneDNN given the fused q/k/v and gate/up weights too; the
    model's own prefill calls them one by one)."""
    most = torch.ops.llmbench_cpu.amx_max_rows()
    value = os.environ.get("LLMBENCH_AMX_MAX_ROWS", "")
    if value:
        if not value.isdigit() or int(value) > 64:
            raise UserError(f"LLMBENCH_AMX_MAX_ROWS={value!r}: use a number of rows up to 64 (up to "
                            f"{KERNEL_MAX_ROWS}: decode steps only)")
        most = min(most, int(value))
    return most if most > KERNEL_MAX_ROWS else 0


def amx_large_rows(kind: str, weight: torch.Tensor) -> int:
    """amx_max_rows() for a linear of this weight: bf16 whose output size is a multiple of 16 and input size of 32;
    0 for any other."""
    if kind != "bfloat16" or weight.shape[0] % 16 or weight.shape[1] % 32:
        return 0
    return amx_max_rows()


def emulated_gemm(kind: str) -> bool:
    """Whether torch multiplies matrices of this 16-bit kind without native arithmetic here (oneDNN says it has
    none: a CPU without avx512_bf16/AMX, or avx512_fp16/AMX-FP16, or ONEDNN_MAX_CPU_ISA below them): its own
    loop then converts every pair of values. One prefill's bf16 linears of the default model, 32 rows, built for
    AVX2 alone on a 2-core AMX Xeon (ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2,
    MKL_ENABLE_INSTRUCTIONS=AVX2): torch's bf16 216 ms, the kernels 8 rows a call 78 ms, float32 (weights
    converted per call) 68 ms; 128 rows 875 / 280 / 174 ms; fp16 alike."""
    mkldnn = torch.ops.mkldnn
    return {"bfloat16": not mkldnn._is_mkldnn_bf16_supported(),
            "float16": not mkldnn._is_mkldnn_fp16_supported()}.get(kind, False)


def amx_description() -> str | None:
    """How bf16 linears use AMX tiles in this process (kernels loaded); None on CPUs without AMX_BF16."""
    rows = torch.ops.llmbench_cpu.amx_rows_from()
    if rows:
        large = amx_max_rows()
        return (f"bf16 linears of {rows}-{KERNEL_MAX_ROWS} rows (batch x beams) on AMX tiles, weights as stored "
                "(LLMBENCH_AMX_MIN_ROWS sets the rows; 0: never); "
                + (f"so are prefills and steps of up to {large} rows (LLMBENCH_AMX_MAX_ROWS)" if large else
                   "prefills and larger steps through the library (LLMBENCH_AMX_MAX_ROWS)"))
    if "amx_bf16" not in cpu_kind().flags:
        return None
    if amx_min_rows_env() == 0:
        return "not used: LLMBENCH_AMX_MIN_ROWS=0"
    if not amx_permitted():
        return "not used: Linux refused AMX tile data to this process (arch_prctl ARCH_REQ_XCOMP_PERM)"
    return ("not used: the kernels were built without AVX512_BF16, which their AMX path needs "
            f"(LLMBENCH_CPU_KERNEL_FLAGS={os.environ.get('LLMBENCH_CPU_KERNEL_FLAGS', '')!r})")


def amx_permitted() -> bool:
    """Whether Linux lets this process use AMX tile data (the request the kernels make; repeating it is harmless)."""
    import ctypes

    sys_arch_prctl, req_xcomp_perm, xtiledata = 158, 0x1023, 18  # x86-64 numbers
    return ctypes.CDLL(None).syscall(sys_arch_prctl, req_xcomp_perm, xtiledata) == 0


def inductor_cache_dir() -> str:
    """Inductor's caches live in a persistent folder, so a second run of the same shape skips most compiling.
    A TORCHINDUCTOR_CACHE_DIR of the user's own is kept; torch's default (a temporary folder) is replaced by the
    suite's, one subfolder per CPU kind and vector instruction set (compiled_code_kind): inductor's graph cache keeps
    C++ written for the instruction set it was generated under and compiles it again for the one the loading process
    picks, so a cache shared by machines of other CPUs, or by runs with another ATEN_CPU_CAPABILITY, gave wrong
    tokens (on an AVX-512 EPYC, steps cached under AVX-512 and loaded with ATEN_CPU_CAPABILITY=avx2 produced only
    token 0; the reverse aborted with "double free or corruption")."""
    from llmbench.paths import cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        torch_default = os.path.abspath(default_cache_dir())
    except ImportError:  # older torch
        torch_default = None
    if current is None or os.path.abspath(current) == torch_default:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = current = str(cache_dir() / "inductor" / compiled_code_kind())
    return current


def compiled_code_kind() -> str:
    """'<the vector ISA inductor picks here>-<hash of the CPU's model and flags>', e.g. 'avx512+avx512_vnni-3f2a...'."""
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        isa = str(pick_vec_isa()).replace(" ", "+") or "no-vec"
    except ImportError:  # older torch
        isa = "unknown-isa"
    return f"{isa}-{hashlib.sha256(cpu_kind().identity.encode()).hexdigest()[:10]}"


def choose_kernels(device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """-> (kernels, why): `library` (oneDNN/MKL, cuBLAS, oneMKL) or `generated` (inductor's own C++ kernels).
    LLMBENCH_COMPILE_KERNELS overrides the choice (the record says so)."""
    forced = os.environ.get("LLMBENCH_COMPILE_KERNELS")
    if forced:
        if forced not in KERNEL_CHOICES or (forced == "generated" and device.type not in ("cpu", "cuda")):
            raise UserError(f"LLMBENCH_COMPILE_KERNELS={forced!r}: use library, or generated (cpu and cuda)")
        return forced, "LLMBENCH_COMPILE_KERNELS"
    if device.type != "cpu":
        return "library", f"{device.type}: vendor GEMM libraries"
    amx = {torch.bfloat16: "amx_bf16", torch.float16: "amx_fp16"}.get(dtype)
    if amx and amx in cpu_kind().flags:
        # Measured on a 2-core AMX Xeon (bf16, batch 1): generated 22.8 ms/token, oneDNN's AMX GEMMs 32-50 ms.
        return "generated", (f"the CPU has {amx}, but a one-token step streams weights faster through generated "
                             "kernels than through oneDNN's AMX GEMMs (LLMBENCH_COMPILE_KERNELS=library uses them)")
    return "generated", ("no AMX for this dtype: inductor-generated reductions stream the weights faster than the "
                         "library GEMV")


def compile_guards() -> str:
    """Whether dynamo's guards run once a shape is compiled and warmed up: `skipped` (the default), or `evaluated`
    (LLMBENCH_COMPILE_GUARDS=evaluated, to measure what skipping them saves)."""
    value = os.environ.get("LLMBENCH_COMPILE_GUARDS") or "skipped"
    if value not in ("skipped", "evaluated"):
        raise UserError(f"LLMBENCH_COMPILE_GUARDS={value!r}: use skipped (the default) or evaluated")
    return value


def compile_options(device: torch.device, kernels: str = "library", requested: str | None = None) -> tuple[str, dict]:
    """-> (mode, inductor options) as one options dict for torch.compile (which takes mode or options).
    A requested mode (--compile-mode; LLMBENCH_COMPILE_MODE overrides it), e.g. `default` (compiles several times
    faster, runs slower), replaces the device's mode."""
    from torch._inductor import list_mode_options

    mode, extra = SETTINGS.get((device.type, kernels), SETTINGS[("xpu", "library")])
    override = os.environ.get("LLMBENCH_COMPILE_MODE") or requested
    if override:
        mode = override
        extra = {k: v for k, v in extra.items() if k == "freezing"}
    if device.type == "cpu":
        extra = {**extra, "cpp.min_chunk_size": max(512, SERIAL_KERNEL_ELEMENTS // torch.get_num_threads())}
    if os.environ.get("LLMBENCH_INDUCTOR_OPTIONS"):  # e.g. '{"cpp_wrapper": true}': replaces or adds options
        try:
            extra = {**extra, **json.loads(os.environ["LLMBENCH_INDUCTOR_OPTIONS"])}
        except (ValueError, TypeError):
            raise UserError("LLMBENCH_INDUCTOR_OPTIONS must be a JSON object of inductor options, e.g. "
                            "'{\"cpp_wrapper\": true}'") from None
        from torch._inductor import config

        unknown = sorted(set(extra) - set(config.get_config_copy()))
        if unknown:
            raise UserError(f"LLMBENCH_INDUCTOR_OPTIONS: {', '.join(unknown)} not an option of this torch's inductor "
                            "(names as in torch._inductor.config, e.g. cpp_wrapper)")
    try:
        return mode, {**list_mode_options(mode), **extra}
    except (KeyError, RuntimeError):
        raise UserError(f"LLMBENCH_COMPILE_MODE={mode!r} is not a torch.compile mode: use default, reduce-overhead, "
                        "max-autotune or max-autotune-no-cudagraphs") from None


# The suite's ops with C entries (cpu_gemv_entries.h) and the C type of each kind of argument in them
ENTRY_OPS = ("linear_dense", "linear_int8", "linear_int8_tiles", "linear_int4", "argmax_rows", "decode_attention")
ENTRY_TYPES = {"Tensor": "AtenTensorHandle", "Optional[Tensor]": "AtenTensorHandle*", "int": "int64_t",
               "float": "double"}


class OpEntries(dict):
    """{op: [its C entry's declaration]}, pickled (inductor's graph cache key) by the ops' names: an op does not
    pickle, and with it in the options every compile bypassed the cache (a warm set-up 57 s instead of 17)."""

    def __reduce__(self):
        return dict, ({str(op): declarations for op, declarations in self.items()},)


def direct_entries() -> dict:
    """inductor's `aot_inductor.custom_ops_to_c_shims` for the loaded CPU kernels' ops: their C entries' declarations
    (from the ops' schemas), which the C++ wrapper calls directly instead of through the dispatcher (the op looked up
    by name, its arguments boxed, on every call): one process alternating the two forms' generations of the default
    model on a 2-vCPU AVX-512 EPYC, the same ids, the dispatcher's steps took 1.009-1.015x the time (bf16) and
    1.010-1.011x (INT4). {} before torch 2.13 (the form verified; older inductors' C++ wrappers unchecked), where the
    entries are not visible (kernels not loaded, or built without torch's headers for them), or with
    LLMBENCH_DIRECT_OPS=0."""
    import ctypes

    from torch.torch_version import TorchVersion

    if os.environ.get("LLMBENCH_DIRECT_OPS", "1") == "0" or TorchVersion(torch.__version__) < "2.13":
        return {}
    visible = ctypes.CDLL(None)  # the process's global symbols
    entries = OpEntries()
    for name in ENTRY_OPS:
        symbol = f"aoti_torch_cpu_{name}"
        op = getattr(torch.ops.llmbench_cpu, name, None)
        if op is None or not hasattr(visible, symbol):
            continue
        schema = op.default._schema
        args = [f"{ENTRY_TYPES[str(a.type)]} {a.name}" for a in schema.arguments]
        args += [f"AtenTensorHandle* ret{i}" for i in range(len(schema.returns))]
        entries[op.default] = [f"AOTITorchError {symbol}({', '.join(args)})"]
    return entries


def _hashable(value):
    """The node arguments as a dict key (lists as tuples); TypeError where one is not hashable."""
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    hash(value)
    return value


def dedupe_pass(namespace: str | None = "llmbench_cpu"):
    """An inductor graph pass that keeps one of identical op calls (same op, same inputs) of `namespace`'s ops, or
    of every op without side effects or randomness (None): the sibling linears of a fused group each call their
    group's kernel (cpu_kernels) or product (fused_siblings) on the same input. None where this torch has no custom
    passes (the calls then stay, each computing the whole group)."""
    try:
        from torch._inductor.custom_graph_pass import CustomGraphPass
    except ImportError:
        return None

    def pure(target) -> bool:
        if not isinstance(target, torch._ops.OpOverload) or namespace not in (None, target.namespace):
            return False
        return not target._schema.is_mutable and torch.Tag.nondeterministic_seeded not in target.tags

    class DedupeCalls(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            seen: dict[tuple, torch.fx.Node] = {}
            for node in list(graph.nodes):
                if node.op != "call_function" or not pure(node.target):
                    continue
                try:
                    key = (node.target, _hashable(node.args), _hashable(node.kwargs))
                except TypeError:
                    continue
                if key in seen:
                    node.replace_all_uses_with(seen[key])
                    graph.erase_node(node)
                else:
                    seen[key] = node

        def uuid(self) -> str:
            return f"llmbench-dedupe-calls-2-{namespace}"

    return DedupeCalls()
