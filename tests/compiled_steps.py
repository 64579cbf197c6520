"""The compile backend's decode step driven token by token, for checking its numerics against eager."""

from __future__ import annotations

import torch


def teacher_forced_log_probs(backend, input_ids: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
    """Log-probabilities (EOS masked) a prepared compile backend's step gives before each token of `continuation`,
    fed one at a time after the prompt: (batch, continuation length, vocab)."""
    batch, length = input_ids.shape
    steps = continuation.shape[1]
    logits = backend._beam_ops  # decided before the steps compile: they then return logits, normalized here
    with torch.inference_mode():
        cache = backend._cache_for(batch, length + steps)
        out = [backend._beam_log_probs(input_ids, cache, backend._positions(0, length))]
        for i in range(steps - 1):
            position = backend._positions(length + i, length + i + 1)
            out.append(backend._call_step(backend._beam_step, continuation[:, i:i + 1], cache, position))
    return torch.stack([backend._log_probs(o) if logits else o for o in out], dim=1)
