"""The pipeline shared by every entry script: flags -> config -> model -> optimized model -> runs -> records."""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings

import torch

from llmbench.cli import RunConfig, parse_config
from llmbench.errors import UserError
from llmbench.models import LoadedModel, exception_name, one_line

RECORD_VERSION = 1


def _errors_only(record) -> bool:
    return record.levelno >= logging.ERROR


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
        deepspeed_logger.removeFilter(_errors_only)
    elif _errors_only not in deepspeed_logger.filters:
        deepspeed_logger.addFilter(_errors_only)
    if verbose:
        return
    transformers.utils.logging.set_verbosity_error()
    for name in ("torchao", "torch._dynamo", "torch._inductor", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def load(config: RunConfig, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from llmbench.preflight import before_weights

    check = before_weights(config, device, dtype)
    if config.dummy_weights:
        from llmbench.dummy import load_dummy_model

        return load_dummy_model(config.model_id, device, dtype, config.trust_remote_code, check)
    from llmbench.models import load_model

    return load_model(config.model_id, device, dtype, config.trust_remote_code, config.quiet, check)


def prepare(config: RunConfig, device: torch.device, dtype: torch.dtype, world=None):
    """-> (loaded model, ready backend, facts for the record) with load and preparation timed apart.
    With a `world` of several ranks (llmbench.distributed.World) the model is sharded before quantization,
    so each rank quantizes its own shard."""
    from llmbench.backends import get_backend

    facts: dict = {}
    backend = get_backend(config.backend)  # first: a backend that cannot run here fails before any loading
    start = time.perf_counter()
    if world is not None and world.size > 1:
        from llmbench.distributed import load_sharded

        loaded, facts["tensor_parallel"] = load_sharded(lambda where: load(config, where, dtype), config, device,
                                                        dtype, world)
        device = torch.device(device.type, world.local_rank) if device.type != "cpu" else device
    else:
        loaded = load(config, device, dtype)
    facts["load_time_s"] = time.perf_counter() - start
    if config.woq:
        from llmbench.quantize import quantize_model

        facts["quantization"] = quantize_model(loaded, config, device, dtype)
    start = time.perf_counter()
    backend.prepare(loaded.model, device, dtype, config)
    facts["prepare_time_s"] = time.perf_counter() - start
    if world is not None and world.size > 1:
        from llmbench.distributed import RankSynchronized

        backend = RankSynchronized(backend, world)
    return loaded, backend, facts


def build_inputs(config: RunConfig, loaded: LoadedModel, device: torch.device):
    from llmbench.prompts import check_fits_context, cut_prompt, synthetic_prompt, user_prompt

    if config.prompt is not None:
        if loaded.tokenizer is None:
            raise UserError("--prompt needs a tokenizer, and this model has none: drop --prompt")
        inputs = user_prompt(loaded.tokenizer, config.prompt, config.batch_size, device)
    elif loaded.tokenizer is None:
        inputs = synthetic_prompt(loaded.model.config.vocab_size, config.input_tokens, config.batch_size, device,
                                  config.seed)
    else:
        inputs = cut_prompt(loaded.tokenizer, config.input_tokens, config.batch_size, device, config.prompt_file)
    check_fits_context(loaded.model.config, inputs.num_tokens, config.max_new_tokens)
    return inputs


def base_record(config: RunConfig, loaded: LoadedModel, backend, device, dtype, facts: dict) -> dict:
    from llmbench.devices import choose_dtype
    from llmbench.models import checkpoint_quantization, weight_bytes
    from llmbench.results import environment, now_utc

    return {
        "record_version": RECORD_VERSION,
        "timestamp": now_utc(),
        "mode": config.mode,
        "model": loaded.name,
        "model_source": loaded.source,
        "device": device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "dtype_reason": choose_dtype(config.dtype, device).reason,
        "backend": backend.name,
        "batch_size": config.batch_size,
        "num_beams": config.num_beams,
        "input_tokens": config.input_tokens,
        "max_new_tokens": config.max_new_tokens,
        "num_iter": config.num_iter,
        "num_warmup": config.num_warmup,
        "token_latency": config.token_latency,
        "seed": config.seed,
        "dummy_weights": loaded.dummy_weights,
        "num_parameters": loaded.num_parameters,
        "weight_bytes": weight_bytes(loaded.model),
        "quantization": facts.get("quantization") or checkpoint_quantization(loaded.model),
        "world_size": 1,
        "load_time_s": facts.get("load_time_s"),
        "prepare_time_s": facts.get("prepare_time_s"),
        "backend_details": backend.details,
        "environment": environment(device),
        "config": config.to_record(),
    }


def run_benchmark(config: RunConfig, world=None) -> int:
    from llmbench.benchmark import Measurement, measure, metrics_for, print_report
    from llmbench.devices import resolve_device, resolve_dtype
    from llmbench.results import append_or_show
    from llmbench.roofline import roofline_metrics

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device, warn=world is None or world.is_main)
    torch.manual_seed(config.seed)
    loaded, backend, facts = prepare(config, device, dtype, world)
    inputs = build_inputs(config, loaded, device)
    record = base_record(config, loaded, backend, device, dtype, facts)
    if world is not None:
        record.update(world_size=world.size, tensor_parallel=facts.get("tensor_parallel"))
    record.update(input_tokens=inputs.num_tokens, prompt_source=inputs.source)
    from llmbench.watch import MeasuredWindow, print_run_notes, profile_after

    if world is None or world.is_main:
        record["roofline"] = record_roofline(config, loaded, device, dtype, inputs.num_tokens, world)
    measurement = Measurement(window=MeasuredWindow(device, config.batch_size, world))
    profile_table = None
    try:
        measure(backend, inputs, config, device, loaded.tokenizer, measurement)
        if config.profile is not None:
            record["profile"], profile_table = profile_after(backend, inputs, config, device, record, world)
    except KeyboardInterrupt as exc:  # for main()'s message: what the finally clause below keeps
        exc.recorded_iterations = len(measurement.iterations) if world is None or world.is_main else 0
        raise
    finally:
        # Whatever happened, iterations already measured are written (marked incomplete).
        if measurement.iterations:
            record.update(
                complete=measurement.complete,
                backend_details=backend.details,
                metrics=metrics_for(measurement, config.batch_size, record["weight_bytes"]),
                iterations=[it.to_record() for it in measurement.iterations],
                output_text=measurement.output_text,
                output_token_ids=measurement.output_token_ids,
            )
            record["metrics"].update(roofline_metrics(record.get("roofline"),
                                                      record["metrics"]["next_token_latency_s"]))
            record.update(measurement.window.record_fields(record, measurement.complete))
            if world is not None and world.size > 1 and measurement.complete:
                from llmbench.distributed import gather

                record["tensor_parallel"].update(rank_weight_bytes=gather(world, record["weight_bytes"]),
                                                 rank_peak_memory_bytes=gather(world, measurement.peak_memory_bytes))
            if world is None or world.is_main:
                append_or_show(config.results, record,
                               lambda: print_report(record["metrics"], device, config.print_memory))
    if world is not None and not world.is_main:
        return 0
    print_report(record["metrics"], device, config.print_memory, record.get("roofline"))
    print_run_notes(record, profile_table)
    if not config.quiet:
        print(f"Record appended to {config.results}")
    return 0


def record_roofline(config: RunConfig, loaded: LoadedModel, device: torch.device, dtype: torch.dtype,
                    input_tokens: int, world=None) -> dict:
    """The record's roofline (llmbench.roofline). A distributed run takes the bandwidth from the cache only: measured
    while the other ranks run, a figure would be disturbed and then cached for every later run."""
    from llmbench.roofline import device_bandwidth, roofline

    world_size = world.size if world is not None else 1
    bandwidth = device_bandwidth(device, measure=world_size == 1)
    try:
        return roofline(loaded.model, dtype, config.batch_size * config.num_beams, input_tokens,
                        config.max_new_tokens, bandwidth, devices=world_size if device.type != "cpu" else 1,
                        world_size=world_size)
    except (AttributeError, TypeError, ValueError) as exc:  # a model shape the byte count does not know
        return {**bandwidth, "roofline_next_token_s": None, "error": f"bytes read per step unknown: {one_line(exc)}"}


def run(config: RunConfig, world=None) -> int:
    from llmbench.preflight import before_loading

    if world is not None and not world.is_main:
        config.quiet = True  # rank 0 alone prints
    before_loading(config)
    if config.mode == "accuracy":
        from llmbench.accuracy import run_accuracy

        return run_accuracy(config, world)
    return run_benchmark(config, world)


def main(argv: list[str] | None = None, prog: str | None = None, world=None) -> int:
    """Entry point: user errors are one line on stderr and a non-zero exit, never a traceback."""
    debug = bool(os.environ.get("LLMBENCH_DEBUG"))
    prog = prog or os.path.basename(sys.argv[0])
    try:
        config = parse_config(argv, prog)
        quiet_libraries(verbose=debug, no_progress=config.quiet, distributed=world is not None and world.size > 1)
        return run(config, world)
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        recorded = getattr(exc, "recorded_iterations", 0)  # set by run_benchmark once measuring had begun
        kept = (f"the {recorded} iteration(s) measured so far were recorded in {config.results}" if recorded
                else "nothing was recorded")
        print(f"{prog}: interrupted; {kept}", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
        if debug:
            raise
        print(f"{prog}: error: {exception_name(exc)}: {one_line(exc)} (set LLMBENCH_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1
