"""Sibling linears (q/k/v, gate/up) as one matrix product in the compile backend's decode steps on GPUs.

A one-token step of a 7B model on an H200 reads 13 GB in about 3 ms, so each extra kernel launch and each product
too small to fill the card shows. The siblings' weights are concatenated once, and each member's weight becomes its
row slice of the concatenation (no second copy). While torch.compile traces, every member computes the whole
product and keeps its columns: the members' calls are identical, so the graph's common-subexpression pass keeps
one. Outside compiled code (eager prompts, accuracy scoring) each member runs on its own slice as before.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from llmbench.backends.compile_settings import dedupe_pass
from llmbench.backends.cpu_kernels import SIBLINGS


class FusedSiblingForward:
    """A replacement forward for one member of a fused group: columns [start, start + out_features) of
    `linear(x, whole, bias)` while compiling, the module's own F.linear otherwise."""

    def __init__(self, module: torch.nn.Linear, whole: torch.nn.Parameter, bias: torch.nn.Parameter | None,
                 start: int, linear):
        self.module, self.whole, self.bias, self.start, self.linear = module, whole, bias, start, linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self.linear(x, self.whole, self.bias).narrow(-1, self.start, self.module.out_features)
        return F.linear(x, self.module.weight, self.module.bias)


def _plain(module: torch.nn.Module | None) -> bool:
    return (isinstance(module, torch.nn.Linear) and "forward" not in vars(module)
            and type(module.weight.data) is torch.Tensor and module.weight.is_floating_point())


def _parameter(tensors: list[torch.Tensor]) -> torch.nn.Parameter:
    # A Parameter, so that dynamo marks it a static input: CUDA graphs read it in place instead of copying it.
    return torch.nn.Parameter(torch.cat([t.detach() for t in tensors]), requires_grad=False)


@torch.no_grad()
def fuse_siblings(model: torch.nn.Module, linear=F.linear) -> int:
    """Fuse every group of SIBLINGS linears with plain floating-point weights of one dtype, input size and bias
    presence (quantized weights keep their own kernels); `linear(x, weight, bias)` computes the fused product while
    compiling. -> how many groups."""
    groups = 0
    for parent in model.modules():
        children = dict(parent.named_children())
        for names in SIBLINGS:
            members = [children.get(name) for name in names]
            if not all(_plain(m) for m in members) or len(
                    {(m.weight.dtype, m.weight.device, m.in_features, m.bias is None) for m in members}) != 1:
                continue
            whole = _parameter([m.weight for m in members])
            bias = None if members[0].bias is None else _parameter([m.bias for m in members])
            start = 0
            for member in members:
                end = start + member.out_features
                member.weight = torch.nn.Parameter(whole[start:end], requires_grad=False)
                if bias is not None:
                    member.bias = torch.nn.Parameter(bias[start:end], requires_grad=False)
                member.forward = FusedSiblingForward(member, whole, bias, start, linear)
                start = end
            groups += 1
    return groups


def fuse_for_compile(model: torch.nn.Module, options: dict, linear=F.linear) -> tuple[dict, int]:
    """fuse_siblings, and the graph pass that keeps one of the members' identical calls; -> (inductor options with
    the pass, groups). Nothing is fused where this torch has no custom graph passes (LLMBENCH_FUSED_SIBLINGS=0:
    nowhere)."""
    dedupe = dedupe_pass(None)
    if dedupe is None or os.environ.get("LLMBENCH_FUSED_SIBLINGS", "1") == "0":
        return options, 0
    return {**options, "post_grad_custom_pre_pass": dedupe}, fuse_siblings(model, linear)
