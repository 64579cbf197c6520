"""The interface every backend implements, and transformers generate() as the shared way to decode."""

from __future__ import annotations

import torch
from transformers import GenerationConfig, StoppingCriteriaList

from llmbench.prompts import PromptInputs
from llmbench.timing import StepTimer


class Backend:
    """prepare() once (timed apart, reported as `prepare_time_s`), then generate() per iteration."""

    name = "base"

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None
        self.details: dict = {}  # backend-specific facts for the record (e.g. compile time)

    @property
    def scored_with(self) -> str:
        """Which module --accuracy-only scores: the backend's .model, optimized as generation runs it, unless a
        backend optimizes only a step lm-eval's whole-sequence scoring does not use."""
        return self.name

    def prepare(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype, config) -> None:
        self.model = model

    def prepare_scoring(self) -> None:
        """Called before --accuracy-only scores .model: a chance to route scoring through the backend's kernels."""

    def warm_up_shapes(self, inputs: PromptInputs, max_new_tokens: int, num_beams: int) -> None:
        """Called before warm-up iterations: a chance to compile for this exact shape outside the timing."""

    def generate(self, inputs: PromptInputs, max_new_tokens: int, num_beams: int,
                 timer: StepTimer | None = None) -> torch.Tensor:
        """-> token ids (batch, input + exactly max_new_tokens)."""
        return hf_generate(self.model, inputs, max_new_tokens, num_beams, timer)


def generation_config(model: torch.nn.Module, max_new_tokens: int, num_beams: int) -> GenerationConfig:
    """Greedy or beam search, exactly max_new_tokens (EOS suppressed until then), no sampling settings
    inherited from the checkpoint."""
    source = getattr(model, "generation_config", None) or GenerationConfig()
    eos = source.eos_token_id if source.eos_token_id is not None else getattr(model.config, "eos_token_id", None)
    pad = source.pad_token_id if source.pad_token_id is not None else getattr(model.config, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    return GenerationConfig(
        max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
        num_return_sequences=1, eos_token_id=eos, pad_token_id=pad, bos_token_id=source.bos_token_id,
        use_cache=True,
    )


def eos_bias(model: torch.nn.Module, eos: list[int], device: torch.device) -> torch.Tensor | None:
    """0 for every token of the output vocabulary, -inf for the EOS tokens, or None where the model names no output
    layer or no EOS within it. Added to float32 scores it forbids EOS, as a mask would, at the price of one read."""
    weight = getattr(model.get_output_embeddings(), "weight", None)
    if weight is None or not eos or not all(0 <= token < weight.shape[0] for token in eos):
        return None
    bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=device)
    bias[eos] = float("-inf")
    return bias


def hf_generate(model: torch.nn.Module, inputs: PromptInputs, max_new_tokens: int, num_beams: int,
                timer: StepTimer | None) -> torch.Tensor:
    criteria = StoppingCriteriaList([timer.stopping_criteria()]) if timer is not None else None
    with torch.inference_mode():
        return model.generate(
            input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
            generation_config=generation_config(model, max_new_tokens, num_beams),
            stopping_criteria=criteria)
