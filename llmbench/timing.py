"""Per-token timestamps taken inside generation (device synchronized first), and their statistics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import StoppingCriteria

from llmbench.devices import synchronize


@dataclass
class IterationTiming:
    e2e_latency_s: float
    generated_tokens: int
    token_latencies_s: list[float] = field(default_factory=list)  # first token, then each next token

    def to_record(self) -> dict:
        return {"e2e_latency_s": self.e2e_latency_s, "generated_tokens": self.generated_tokens,
                "token_latencies_s": self.token_latencies_s}


class StepTimer:
    """Timestamps one generation: start(), step() after every generated token, stop()."""

    def __init__(self, device: torch.device, per_token: bool = True):
        self.device = device
        self.per_token = per_token
        self._start = 0.0
        self._stamps: list[float] = []

    def start(self) -> None:
        synchronize(self.device)
        self._stamps = []
        self._start = time.perf_counter()

    def step(self) -> None:
        if self.per_token:
            synchronize(self.device)
            self._stamps.append(time.perf_counter())

    def stop(self, generated_tokens: int) -> IterationTiming:
        synchronize(self.device)
        end = time.perf_counter()
        edges = [self._start, *self._stamps]
        latencies = [b - a for a, b in zip(edges, edges[1:])]
        return IterationTiming(end - self._start, generated_tokens, latencies)

    def stopping_criteria(self) -> StoppingCriteria:
        """This timer as a transformers stopping criterion: called once per generated token, never stops."""
        return _TimerCriterion(self)


class _TimerCriterion(StoppingCriteria):
    def __init__(self, timer: StepTimer):
        self.timer = timer

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.timer.step()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def summarize(iterations: list[IterationTiming], batch_size: int) -> dict:
    """The record's metrics; next-token statistics pool every later step of every measured iteration.
    Spread: sample stddev and CV of e2e latency, first-token latency and per-iteration throughput across
    iterations, and of next-token latency across the pooled steps."""
    e2e = np.array([it.e2e_latency_s for it in iterations])
    generated = sum(it.generated_tokens for it in iterations) * batch_size
    metrics = {
        "e2e_latency_s": float(e2e.mean()),
        "throughput_tokens_per_s": float(generated / e2e.sum()),
        "first_token_latency_s": None,
        "next_token_latency_s": None,
        "p50_next_token_latency_s": None,
        "p90_next_token_latency_s": None,
        "p99_next_token_latency_s": None,
    }
    timed = [it.token_latencies_s for it in iterations if it.token_latencies_s]
    first, later = np.array([]), np.array([])
    if timed:
        first = np.array([t[0] for t in timed])
        metrics["first_token_latency_s"] = float(first.mean())
        later = np.concatenate([t[1:] for t in timed])
        if later.size:
            metrics["next_token_latency_s"] = float(later.mean())
            for p in (50, 90, 99):
                metrics[f"p{p}_next_token_latency_s"] = float(np.percentile(later, p))
    throughputs = np.array([it.generated_tokens * batch_size / it.e2e_latency_s for it in iterations
                            if it.e2e_latency_s > 0])
    for name, values, unit in (("e2e_latency", e2e, "_s"), ("first_token_latency", first, "_s"),
                               ("next_token_latency", later, "_s"), ("throughput", throughputs, "_tokens_per_s")):
        metrics[f"{name}_stddev{unit}"], metrics[f"{name}_cv"] = spread(values)
    return metrics


def spread(values: np.ndarray) -> tuple[float | None, float | None]:
    """(sample standard deviation, coefficient of variation = stddev / mean); None below two values."""
    if values.size < 2:
        return None, None
    stddev = float(values.std(ddof=1))
    mean = float(values.mean())
    return stddev, (stddev / mean if mean else None)
