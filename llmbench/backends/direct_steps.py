"""Decode steps called without dynamo: on cpu, a torch.compile backend (inductor, as torch.compile calls it) whose
compiled graphs note their last call, and the direct call of a warmed-up shape's graph built from one such call; on
cuda, the whole step captured as one CUDA graph. Used by the compile backend (compiled.py), which decides when a
shape may call its graph directly."""

from __future__ import annotations

import torch


class StepGraphs:
    """The decode steps' torch.compile backend on cpu: inductor (compile_fx with the step's mode and options, as
    torch.compile's own inductor backend calls it), whose compiled graphs note their last call (graph, inputs,
    outputs) and count calls, so that a warmed-up shape's steps can call their graph directly (DirectStep)."""

    compiler_name = "inductor"

    def __init__(self, options: dict):
        self.options = options
        self.calls = 0
        self.last = None

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        graph = compile_fx(gm, example_inputs, config_patches=dict(self.options))

        def call(*args):
            outputs = graph(*args)
            self.calls += 1
            self.last = (graph, args, outputs)
            return outputs

        return call


class DirectStep:
    """A compiled decode step called without dynamo: dynamo's frame evaluation and its gathering of the graph's
    inputs (every weight and cache tensor, by attribute lookups in Python) cost ~1 ms a step on cpu, ~10% of a
    small model's step. The graph gets the inputs of a step that went through dynamo, with the new token (and
    position) in place of that step's; the weights and the cache are the same tensors every step (the cache is
    reset in place between runs)."""

    def __init__(self, graph, args: list, ids_at: int, position_at: int | None):
        self.graph, self.args, self.ids_at, self.position_at = graph, args, ids_at, position_at

    @classmethod
    def of(cls, graph, args: tuple, ids: torch.Tensor, position: torch.Tensor | None) -> DirectStep | None:
        """-> the direct call, or None where the token (or the position) is not exactly one of the inputs."""
        ids_at = [i for i, a in enumerate(args) if a is ids]
        position_at = [i for i, a in enumerate(args) if position is not None and a is position]
        if len(ids_at) != 1 or len(position_at) != (position is not None):
            return None
        return cls(graph, list(args), ids_at[0], position_at[0] if position_at else None)

    def __call__(self, ids: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        self.args[self.ids_at] = ids
        if self.position_at is not None:
            self.args[self.position_at] = position
        return self.graph(*self.args)[0]


class CudaGraphStep:
    """A warmed-up shape's whole compiled decode step captured as one CUDA graph (cuda, where inductor's own CUDA
    graphs are off): each token copies its ids and position into the graph's inputs and replays it. Without it each
    step runs dynamo's entry, AOT autograd's wrappers and inductor's launches on the host (every weight and cache
    tensor an input; TorchAO's INT4 weights unwrapped each call) while the GPU waits on a step that token-latency
    timing synchronizes. The cache is updated in place by the graph, at its fixed addresses."""

    def __init__(self, step, ids: torch.Tensor, cache, position: torch.Tensor):
        self.ids, self.position = ids.clone(), position.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # libraries' lazy set-up on the capturing stream; writes what the step writes
            step(self.ids, cache, self.position)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = step(self.ids, cache, self.position)

    def __call__(self, ids: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """The step's output, a copy (the next replay overwrites the graph's own)."""
        self.ids.copy_(ids)
        self.position.copy_(position)
        self.graph.replay()
        return self.out.clone()
