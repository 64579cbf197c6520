"""The opening every run shares: device and dtype resolved once, load (or shard), quantize, prepare the backend,
cut the inputs, start the record. The benchmark and accuracy runners and the scripts in benchmarks/ all open here.

    flags -> RunConfig -> open_pipeline() -> Pipeline(loaded model, prepared backend) -> inputs() / base_record()
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch

from llmbench import errors_only
from llmbench.allocator import NONE_FOUND
from llmbench.allocator import state as allocator_state
from llmbench.backends import backend_overrides, get_backend
from llmbench.backends.base import Backend
from llmbench.cli import RunConfig
from llmbench.devices import choose_dtype, resolve_device
from llmbench.distributed import RankSynchronized, load_sharded, rank_device
from llmbench.dummy import load_dummy_model
from llmbench.errors import UserError
from llmbench.models import LoadedModel, checkpoint_quantization, load_model, weight_bytes
from llmbench.preflight import before_weights
from llmbench.prompts import PromptInputs, check_fits_context, cut_prompt, synthetic_prompt, user_prompt
from llmbench.quantize import quantize_model
from llmbench.records import RECORD_VERSION
from llmbench.results import environment, now_utc


def quiet_libraries(verbose: bool, no_progress: bool, distributed: bool = False) -> None:
    """Library chatter (deprecations, optional-kernel notices) would bury the report."""
    import transformers

    if no_progress:
        transformers.utils.logging.disable_progress_bar()
    # DeepSpeed logs "Setting accelerator to CPU" on stdout when anything imports it, also in runs that never use
    # it (transformers' save_pretrained, converting a GGUF file, imports it through accelerate). Its logger resets
    # its own level on import, so a filter (which stays) keeps its warnings out of single-process runs.
    deepspeed_logger = logging.getLogger("DeepSpeed")
    if verbose or distributed:
        deepspeed_logger.removeFilter(errors_only)
    elif errors_only not in deepspeed_logger.filters:
        deepspeed_logger.addFilter(errors_only)
    if verbose:
        return
    transformers.utils.logging.set_verbosity_error()
    for name in ("torchao", "torch._dynamo", "torch._inductor", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def load(config: RunConfig, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """The model with its tokenizer (real or --dummy-weights), after the checks that need only its config."""
    check = before_weights(config, device, dtype)
    if config.dummy_weights:
        return load_dummy_model(config.model_id, device, dtype, config.trust_remote_code, check)
    return load_model(config.model_id, device, dtype, config.trust_remote_code, config.quiet, check)


@dataclass
class Pipeline:
    """A loaded, quantized and prepared model, ready to generate: what a runner times or scores."""

    config: RunConfig
    device: torch.device
    dtype: torch.dtype
    dtype_reason: str
    loaded: LoadedModel
    backend: Backend
    world: object | None = None  # llmbench.ranks.World of a tensor-parallel run
    facts: dict = field(default_factory=dict)  # load/prepare times, quantization, tensor_parallel

    @property
    def is_main(self) -> bool:
        """Whether this process prints and records (rank 0, or a single process)."""
        return self.world is None or self.world.is_main

    @property
    def world_size(self) -> int:
        return self.world.size if self.world is not None else 1

    def inputs(self) -> PromptInputs:
        """The prompt batch: --prompt, else cut from prompt.json, else synthetic ids (no tokenizer)."""
        config, loaded = self.config, self.loaded
        if config.prompt is not None:
            if loaded.tokenizer is None:
                raise UserError("--prompt needs a tokenizer, and this model has none: drop --prompt")
            inputs = user_prompt(loaded.tokenizer, config.prompt, config.batch_size, self.device)
        elif loaded.tokenizer is None:
            inputs = synthetic_prompt(loaded.model.config.vocab_size, config.input_tokens, config.batch_size,
                                      self.device, config.seed)
        else:
            inputs = cut_prompt(loaded.tokenizer, config.input_tokens, config.batch_size, self.device,
                                config.prompt_file)
        check_fits_context(loaded.model.config, inputs.num_tokens, config.max_new_tokens)
        return inputs

    def base_record(self) -> dict:
        """The fields every record of this run shares (llmbench.records.Record): what ran, and `config`, what
        was asked for. The runners add their own fields and figures."""
        config, loaded = self.config, self.loaded
        return {
            "record_version": RECORD_VERSION,
            "timestamp": now_utc(),
            "mode": config.mode,
            "model": loaded.name,
            "model_source": loaded.source,
            "device": self.device.type,
            "dtype": str(self.dtype).removeprefix("torch."),
            "dtype_reason": self.dtype_reason,
            "backend": self.backend.name,
            "batch_size": config.batch_size,
            "seed": config.seed,
            "dummy_weights": loaded.dummy_weights,
            "num_parameters": loaded.num_parameters,
            "weight_bytes": weight_bytes(loaded.model),
            "quantization": self.facts.get("quantization") or checkpoint_quantization(loaded.model),
            "world_size": self.world_size,
            **({"tensor_parallel": self.facts.get("tensor_parallel")} if self.world is not None else {}),
            "load_time_s": self.facts.get("load_time_s"),
            "prepare_time_s": self.facts.get("prepare_time_s"),
            "backend_details": self.backend.details,
            "backend_overrides": backend_overrides(self.backend.name),
            "environment": {**environment(self.device), "allocator": self.facts.get("allocator")},
            "config": config.to_record(),
        }


def open_pipeline(config: RunConfig, world=None) -> Pipeline:
    """Resolve the device and dtype, seed, load the model (sharded over the ranks of a `world` of several, before
    quantization, so each rank quantizes its own shard), quantize, prepare the backend; load and preparation are
    timed apart."""
    device = resolve_device(config.device)
    allocator = allocator_state(config.allocator)  # first: an allocator asked for and missing stops the run here
    choice = choose_dtype(config.dtype, device)
    if choice.warning and (world is None or world.is_main):
        print(choice.warning, file=sys.stderr, flush=True)
    if device.type == "cpu" and allocator["reason"].startswith(NONE_FOUND) and not config.quiet and \
            (world is None or world.is_main):
        print(f"note: the C library's malloc ({allocator['reason']}): jemalloc or tcmalloc take ~5-10% off a small "
              "model's decode steps on cpu", file=sys.stderr, flush=True)
    dtype = choice.dtype
    torch.manual_seed(config.seed)
    backend = get_backend(config.backend)  # first: a backend that cannot run here fails before any loading
    if world is not None and world.size > 1 and config.backend == "compile" and device.type != "cpu":
        raise UserError(f"--backend compile runs tensor-parallel on cpu only (its {device.type} steps replay as "
                        "graphs, not checked with all-reduces inside): use --backend eager")
    facts: dict = {"allocator": allocator}
    start = time.perf_counter()
    where = device
    if world is not None and world.size > 1:
        loaded, facts["tensor_parallel"] = load_sharded(lambda on: load(config, on, dtype), config, device, dtype,
                                                        world)
        where = rank_device(device, world)
    else:
        loaded = load(config, device, dtype)
    facts["load_time_s"] = time.perf_counter() - start
    if config.woq:
        facts["quantization"] = quantize_model(loaded, config, where, dtype)
    start = time.perf_counter()
    backend.prepare(loaded.model, where, dtype, config)
    facts["prepare_time_s"] = time.perf_counter() - start
    if world is not None and world.size > 1:
        backend = RankSynchronized(backend, world)
    return Pipeline(config, device, dtype, choice.reason, loaded, backend, world, facts)
