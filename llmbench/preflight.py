"""Checks a run makes before the model's weights load: the results file, the prompt, the context, the memory.

Each check that can fail on bad input fails here, in seconds, instead of after the load (or after the whole
benchmark, for the results file)."""

from __future__ import annotations

import torch

from llmbench.cli import RunConfig
from llmbench.dummy import count_parameters
from llmbench.memory import estimate_run, require
from llmbench.prompts import check_fits_context, cut_prompt, load_prompt_text
from llmbench.results import check_appendable


def before_loading(config: RunConfig) -> None:
    """What needs no model: the results file can be appended to, and the prompt file is well formed."""
    check_appendable(config.results)
    if config.mode == "benchmark" and config.prompt is None:
        load_prompt_text(config.prompt_file)


def _weight_bytes(model_config, dtype: torch.dtype, trust_remote_code: bool) -> int:
    """The weights in the run's dtype, counted on the meta device (a checkpoint already quantized is counted at
    that dtype too: an over-estimate, which matters only near the limit)."""
    try:
        return count_parameters(model_config, trust_remote_code) * dtype.itemsize
    except (ValueError, TypeError, ImportError, OSError):  # a config AutoModelForCausalLM cannot build: no estimate
        return 0


def before_weights(config: RunConfig, device: torch.device, dtype: torch.dtype):
    """-> a check(model_config, tokenizer) for the loaders: the prompt is long enough and fits the model's context,
    and weights + KV cache + activations fit in the device's free memory."""
    def check(model_config, tokenizer) -> None:
        if config.mode != "benchmark":
            require(_weight_bytes(model_config, dtype, config.trust_remote_code), device,
                    f"-m {config.model_id or 'the default model'} in {str(dtype).removeprefix('torch.')}",
                    "pick a smaller model or a device with more memory")
            return
        input_tokens = config.input_tokens
        if tokenizer is not None and config.prompt is not None:
            input_tokens = len(tokenizer(config.prompt)["input_ids"])
        elif tokenizer is not None:
            cut_prompt(tokenizer, config.input_tokens, 1, torch.device("cpu"), config.prompt_file)
        check_fits_context(model_config, input_tokens, config.max_new_tokens)
        need = estimate_run(model_config, _weight_bytes(model_config, dtype, config.trust_remote_code), dtype,
                            config.batch_size, config.num_beams, input_tokens, config.max_new_tokens)
        require(need.total, device,
                f"--batch-size {config.batch_size} --num-beams {config.num_beams} with {input_tokens} + "
                f"{config.max_new_tokens} tokens ({need.parts()})",
                "lower --batch-size, --num-beams, --input-tokens or --max-new-tokens, or use a smaller model")
    return check
