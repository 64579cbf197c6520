"""DeepSpeed AutoTP's sharded layers as plain torch.nn.Linear modules (plus the all-reduce they need).

The weight-only quantizer and the compile backends look for torch.nn.Linear; after this conversion they see,
and quantize, each rank's shard. The arithmetic is AutoTP's: column-sharded layers compute their slice of the
output, row-sharded layers (attention output, MLP down projection, output head) compute a partial sum that an
all-reduce completes.
"""

from __future__ import annotations

import torch
from torch import nn


class RowParallelLinear(nn.Module):
    """y = all_reduce(x[..., part] @ W_part.T) + b, with the replicated bias added once after the sum."""

    tp_sharded = True

    def __init__(self, linear: nn.Linear, bias: nn.Parameter | None, group, input_part: slice | None):
        super().__init__()
        self.linear, self.bias, self.group, self.input_part = linear, bias, group, input_part

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from deepspeed import comm

        if self.input_part is not None:
            x = x[..., self.input_part]
        y = self.linear(x)
        comm.inference_all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


def _as_linear(weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Linear:
    linear = torch.nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None,
                                      device="meta", dtype=weight.dtype)
    linear.weight = weight
    if bias is not None:
        linear.bias = bias
    return linear


def plain_linears(model: nn.Module) -> int:
    """Replace AutoTP's plain column and row layers in place; -> how many were replaced. Layers with their own
    splitting rules (fused projections, vocabulary-parallel embeddings) stay DeepSpeed's."""
    from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer, LmHeadLinearAllreduce

    replaced = 0
    for name, module in list(model.named_modules()):
        kind = type(module)
        if getattr(module, "weight", None) is not None and module.weight.numel() == 0:
            continue  # an empty shard (AutoTP splits in blocks of 64 features): nothing to compute or quantize
        if kind is LinearLayer and not module.gather_output:
            new: nn.Module = _as_linear(module.weight, module.bias)
            new.tp_sharded = True
        elif kind in (LinearAllreduce, LmHeadLinearAllreduce):
            part = None
            if kind is LmHeadLinearAllreduce:  # its input is whole: each rank takes its columns' slice
                start = sum(module._partition_sizes[:module.tp_index])
                part = slice(start, start + module._partition_sizes[module.tp_index])
            new = RowParallelLinear(_as_linear(module.weight, None), module.bias, module.mp_group, part)
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
        replaced += 1
    return replaced
