"""A gated MLP's SiLU and multiply done by its gate/up kernel call (the compile backend's cpu kernels).

Llama-style MLPs compute down(silu(gate(x)) * up(x)). With gate and up fused into one call of the suite's kernels
(cpu_kernels' siblings), inductor still runs the SiLU and the multiply as a kernel of its own between that call and
down's: an OpenMP region over the outputs whose every line comes from memory after the weights' stream, 4.8 us a layer
with a 2-vCPU AVX-512 EPYC guest's CPUs together, 8.5-10 us apart (docs/measured.md). This inductor graph pass
replaces `silu(y[..., :n]) * y[..., n:]` (slices, or the halves of a split, in either order of the product), y a
kernel linear's output used by nothing else, with the linear's `act=1` call, which multiplies in the threads that
read the rows (cpu_gemv_run.h's run). Phi-3's fused gate_up_proj and ChatGLM's swiglu take the same form.
LLMBENCH_FUSED_GLU=0 keeps inductor's kernel.
"""

from __future__ import annotations

import operator
import os

import torch

from llmbench.backends.compile_settings import dedupe_pass

LINEARS = ("linear_dense", "linear_int8", "linear_int8_tiles", "linear_int4")
ACT_SILU_MUL = 1  # cpu_gemv_run.h's act
HALF_ROWS = 64  # each half a multiple of every kernel's block of rows (at most 16)


def enabled() -> bool:
    return os.environ.get("LLMBENCH_FUSED_GLU", "1") != "0"


def describe() -> str:
    """The record's `gate_up_activation`."""
    if enabled():
        return ("SiLU and multiply in the gate/up kernel call, where a compiled graph computes silu(gate) * up of "
                "one (not GELU or other activations)")
    return "inductor's kernel after the gate/up call (LLMBENCH_FUSED_GLU=0)"


def _linear(node: torch.fx.Node) -> bool:
    target = node.target
    return (node.op == "call_function" and isinstance(target, torch._ops.OpOverload)
            and target.namespace == "llmbench_cpu" and target._schema.name.split("::")[-1] in LINEARS
            and not node.kwargs.get("act") and len(node.args) < len(target._schema.arguments))


def _last_dim(dim: int, rank: int) -> bool:
    return dim in (-1, rank - 1)


def _half_of(node: torch.fx.Node, y: torch.fx.Node, size: int, rank: int) -> int | None:
    """0 or 1 where `node` is the first or the second half of y's last dimension (of `size`), else None."""
    aten = torch.ops.aten
    if node.target is aten.slice.Tensor and node.args[0] is y:
        dim, start, end, step = (list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1:])[:4]
        if not _last_dim(dim, rank) or step != 1:
            return None
        if start == 0 and end == size // 2:
            return 0
        if start == size // 2 and (end is None or end >= size):
            return 1
        return None
    if node.target is operator.getitem:
        split, index = node.args
        if isinstance(split, torch.fx.Node) and split.args and split.args[0] is y and _halves(split, size, rank):
            return index
    return None


def _halves(split: torch.fx.Node, size: int, rank: int) -> bool:
    aten = torch.ops.aten
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if not _last_dim(dim, rank):
        return False
    if split.target is aten.split.Tensor:
        return split.args[1] == size // 2
    return split.target is aten.split_with_sizes.default and list(split.args[1]) == [size // 2, size // 2]


def _arg_pair(node: torch.fx.Node, target) -> tuple | None:
    return tuple(node.args[:2]) if node.op == "call_function" and node.target is target and len(node.args) >= 2 \
        else None


def _silu_input(node) -> tuple[torch.fx.Node, list[torch.fx.Node]] | None:
    """(a, the nodes computing it) where `node` is silu(a) as inductor's graphs write it: aten.silu; its
    decomposition a / (1 + exp(-a)) or a * sigmoid(a); in float32 between conversions from and to a's dtype."""
    aten, prims = torch.ops.aten, torch.ops.prims
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return None
    if node.target is aten.silu.default:
        return node.args[0], [node]
    if node.target is prims.convert_element_type.default:
        inner = _silu_input(node.args[0])
        if inner is None or inner[0].target is not prims.convert_element_type.default or \
                inner[0].args[1] != torch.float32:
            return None
        source = inner[0].args[0]
        value = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
        if value is None or value.dtype != node.args[1]:
            return None
        return source, [node, *inner[1], inner[0]]
    pair = _arg_pair(node, aten.div.Tensor)
    if pair is not None:
        a, denominator = pair
        terms = _arg_pair(denominator, aten.add.Tensor) if isinstance(denominator, torch.fx.Node) else None
        exp = next((t for t in terms or () if isinstance(t, torch.fx.Node) and t.target is aten.exp.default), None)
        if exp is None or 1 not in terms or exp.args[0].target is not aten.neg.default or exp.args[0].args[0] is not a:
            return None
        return a, [node, denominator, exp, exp.args[0]]
    pair = _arg_pair(node, aten.mul.Tensor)
    if pair is not None:
        for a, sigmoid in (pair, pair[::-1]):
            if isinstance(sigmoid, torch.fx.Node) and sigmoid.target is aten.sigmoid.default and sigmoid.args[0] is a:
                return a, [node, sigmoid]
    return None


def _fuse_one(graph: torch.fx.Graph, y: torch.fx.Node) -> bool:
    aten, value = torch.ops.aten, y.meta.get("val")
    if not isinstance(value, torch.Tensor) or value.shape[-1] % (2 * HALF_ROWS):
        return False
    size, rank = value.shape[-1], value.dim()
    users = list(y.users)
    splits = [u for u in users if u.target in (aten.split.Tensor, aten.split_with_sizes.default)]
    if len(splits) == 1 and len(users) == 1:  # the halves are getitems of one split
        users = list(splits[0].users)
    halves = {}
    for user in users:
        half = _half_of(user, y, size, rank)
        if half is None or half in halves:
            return False
        halves[half] = user
    if len(halves) != 2 or len(halves[1].users) != 1:
        return False
    gate, up, mul = halves[0], halves[1], next(iter(halves[1].users))
    pair = _arg_pair(mul, aten.mul.Tensor)
    if pair is None or up not in pair or mul.meta.get("val") is None:
        return False
    silu = _silu_input(pair[1] if pair[0] is up else pair[0])
    if silu is None or silu[0] is not gate or mul.meta["val"].dtype != value.dtype or \
            tuple(mul.meta["val"].shape) != (*value.shape[:-1], size // 2):
        return False
    chain = {gate, *silu[1]}
    if any(set(node.users) - chain - {mul} for node in chain):  # a step of the SiLU used elsewhere too
        return False
    with graph.inserting_before(mul):
        call = graph.call_function(y.target, y.args, {**y.kwargs, "act": ACT_SILU_MUL})
    call.meta.update(mul.meta)
    mul.replace_all_uses_with(call)
    for node in (mul, *silu[1], gate, up, *splits, y):  # users before what they use
        graph.erase_node(node)
    return True


def fuse_silu_mul(graph: torch.fx.Graph) -> int:
    """Each kernel linear whose output only feeds silu(first half) * second half: one act=1 call. -> how many."""
    return sum(_fuse_one(graph, y) for y in list(graph.nodes) if _linear(y))


def kernel_passes():
    """The compile backend's graph pass with the cpu kernels: dedupe_pass (one call per fused sibling group), then,
    unless LLMBENCH_FUSED_GLU=0, fuse_silu_mul. None where this torch has no custom passes."""
    dedupe = dedupe_pass()
    if dedupe is None:
        return None
    from torch._inductor.custom_graph_pass import CustomGraphPass

    fuse = enabled()

    class KernelPasses(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            dedupe(graph)
            if fuse:
                fuse_silu_mul(graph)

        def uuid(self) -> str:
            return f"{dedupe.uuid()}+glu-1-{int(fuse)}"

    return KernelPasses()
