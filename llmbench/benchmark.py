"""--benchmark: the measured loop (warm-up, timed iterations), statistics, the console report and the record."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from llmbench.backends.base import Backend
from llmbench.cli import RunConfig
from llmbench.devices import peak_memory_bytes, peak_memory_kind, reset_peak_memory
from llmbench.distributed import gather
from llmbench.errors import UserError, one_line
from llmbench.host import last_level_cache_bytes
from llmbench.pipeline import Pipeline, open_pipeline
from llmbench.prompts import PromptInputs
from llmbench.results import append_or_show
from llmbench.roofline import device_bandwidth, roofline, roofline_line, roofline_metrics, with_bandwidth
from llmbench.timing import IterationTiming, StepTimer, summarize
from llmbench.watch import MeasuredWindow, print_run_notes, profile_after


@dataclass
class Measurement:
    iterations: list[IterationTiming] = field(default_factory=list)
    output_text: str | None = None
    output_token_ids: list[int] | None = None
    peak_memory_bytes: int | None = None
    complete: bool = False
    window: object | None = None  # llmbench.watch.MeasuredWindow: started and stopped around the measured loop


def decode_first_row(tokenizer, ids: torch.Tensor, input_len: int) -> tuple[str | None, list[int]]:
    new_ids = ids[0, input_len:].tolist()
    text = tokenizer.decode(new_ids, skip_special_tokens=False) if tokenizer is not None else None
    return text, new_ids


def measure(backend: Backend, inputs: PromptInputs, config, device: torch.device, tokenizer,
            measurement: Measurement) -> Measurement:
    """Fill `measurement` as iterations finish, so a caller that catches an interruption keeps them."""
    n_new, beams = config.max_new_tokens, config.num_beams
    timer = StepTimer(device, per_token=config.token_latency)
    backend.warm_up_shapes(inputs, n_new, beams)
    for _ in tqdm(range(config.num_warmup), desc="warm-up", disable=config.quiet, file=sys.stderr):
        backend.generate(inputs, n_new, beams, timer if config.token_latency else None)
    reset_peak_memory(device)
    if measurement.window is not None:
        measurement.window.start()
    for _ in tqdm(range(config.num_iter), desc="measured", disable=config.quiet, file=sys.stderr):
        timer.start()
        ids = backend.generate(inputs, n_new, beams, timer if config.token_latency else None)
        generated = int(ids.shape[1]) - inputs.num_tokens
        timing = timer.stop(generated)
        if generated != n_new:
            raise UserError(f"generation returned {generated} new tokens instead of {n_new}: "
                            f"backend {backend.name} does not honour min_new_tokens for this model")
        if config.token_latency and len(timing.token_latencies_s) != generated:
            raise UserError(f"timed {len(timing.token_latencies_s)} steps for {generated} tokens: "
                            f"backend {backend.name} skips the per-token hook")
        if measurement.output_text is None and measurement.output_token_ids is None:
            measurement.output_text, measurement.output_token_ids = decode_first_row(tokenizer, ids, inputs.num_tokens)
            if not config.quiet and measurement.output_text is not None:
                print(f"Output: {measurement.output_text!r}", flush=True)
        measurement.iterations.append(timing)
    if measurement.window is not None:
        measurement.window.stop(sum(it.generated_tokens for it in measurement.iterations))
    measurement.peak_memory_bytes = peak_memory_bytes(device)
    measurement.complete = True
    return measurement


def metrics_for(measurement: Measurement, batch_size: int, weight_bytes: int) -> dict:
    metrics = summarize(measurement.iterations, batch_size)
    next_s = metrics["next_token_latency_s"]
    metrics["weight_bandwidth_gb_s"] = weight_bytes / next_s / 1e9 if next_s else None
    metrics["peak_memory_bytes"] = measurement.peak_memory_bytes
    return metrics


def print_report(metrics: dict, device: torch.device, print_memory: bool, roofline: dict | None = None) -> None:
    """The seed's console labels (log parsers rely on them), then the additions."""
    print(f"Inference latency: {metrics['e2e_latency_s']:.3f} sec.")
    if metrics["first_token_latency_s"] is not None:
        print(f"First token average latency: {metrics['first_token_latency_s']:.3f} sec.")
    if metrics["next_token_latency_s"] is not None:
        print(f"Average 2... latency: {metrics['next_token_latency_s']:.3f} sec.")
        print(f"P50 2... latency: {metrics['p50_next_token_latency_s']:.3f} sec.")
        print(f"P90 2... latency: {metrics['p90_next_token_latency_s']:.3f} sec.")
        print(f"P99 2... latency: {metrics['p99_next_token_latency_s']:.3f} sec.")
    print(f"Throughput: {metrics['throughput_tokens_per_s']:.2f} tokens/s")
    print_spread(metrics)
    if metrics["weight_bandwidth_gb_s"] is not None:
        print(f"Weight read bandwidth: {metrics['weight_bandwidth_gb_s']:.2f} GB/s")
    if (line := roofline_line(metrics, roofline)) is not None:
        print(line)
    if print_memory and metrics["peak_memory_bytes"] is not None:
        print(f"Peak memory ({peak_memory_kind(device)}): {metrics['peak_memory_bytes'] / 2**30:.3f} GiB")


SPREAD_LINES = (  # (label, mean key, stddev key, cv key, unit, decimals); labels unlike the seed's labels
    ("inference", "e2e_latency_s", "e2e_latency_stddev_s", "e2e_latency_cv", "sec.", 3),
    ("first token", "first_token_latency_s", "first_token_latency_stddev_s", "first_token_latency_cv", "sec.", 3),
    ("next token", "next_token_latency_s", "next_token_latency_stddev_s", "next_token_latency_cv", "sec.", 3),
    ("throughput", "throughput_tokens_per_s", "throughput_stddev_tokens_per_s", "throughput_cv", "tokens/s", 2),
)


def print_spread(metrics: dict) -> None:
    """`mean ± stddev (CV)` on lines of their own, for the figures measured more than once."""
    for label, key, sd_key, cv_key, unit, digits in SPREAD_LINES:
        mean, stddev, cv = metrics.get(key), metrics.get(sd_key), metrics.get(cv_key)
        if mean is None or stddev is None:
            continue
        cv_text = f" (CV {cv:.1%})" if cv is not None else ""
        print(f"Spread, {label}: {mean:.{digits}f} ± {stddev:.{digits}f} {unit}{cv_text}")


def record_roofline(run: Pipeline, input_tokens: int) -> dict:
    """The record's roofline (llmbench.roofline). A distributed run takes the bandwidth from the cache only: measured
    while the other ranks run, a figure would be disturbed and then cached for every later run."""
    config, device = run.config, run.device
    bandwidth = device_bandwidth(device, measure=run.world_size == 1)
    try:
        return roofline(run.loaded.model, run.dtype, config.batch_size * config.num_beams, input_tokens,
                        config.max_new_tokens, bandwidth, devices=run.world_size if device.type != "cpu" else 1,
                        world_size=run.world_size,
                        cache_bytes=last_level_cache_bytes() if device.type == "cpu" else None)
    except (AttributeError, TypeError, ValueError) as exc:  # a model shape the byte count does not know
        return {**bandwidth, "roofline_next_token_s": None, "error": f"bytes read per step unknown: {one_line(exc)}"}


def run_benchmark(config: RunConfig, world=None) -> int:
    """--benchmark: time config.num_iter generations of the prepared model and append one record. Iterations
    already measured are recorded (marked incomplete) whatever stops the run."""
    run = open_pipeline(config, world)
    device, backend = run.device, run.backend
    inputs = run.inputs()
    record = run.base_record()
    record.update(num_beams=config.num_beams, input_tokens=inputs.num_tokens, prompt_source=inputs.source,
                  max_new_tokens=config.max_new_tokens, num_iter=config.num_iter, num_warmup=config.num_warmup,
                  token_latency=config.token_latency)  # input_tokens: the prompt's length as measured
    if run.is_main:
        record["roofline"] = record_roofline(run, inputs.num_tokens)
    measurement = Measurement(window=MeasuredWindow(device, config.batch_size, world, record.get("roofline")))
    profile_table = None
    try:
        measure(backend, inputs, config, device, run.loaded.tokenizer, measurement)
        measurement.window.check_host()
        if config.profile is not None:
            record["profile"], profile_table = profile_after(backend, inputs, config, device, record, world)
    except KeyboardInterrupt as exc:  # for main()'s message: what the finally clause below keeps
        exc.recorded_iterations = len(measurement.iterations) if run.is_main else 0
        raise
    finally:
        if measurement.iterations:
            record.update(
                complete=measurement.complete,
                backend_details=backend.details,
                metrics=metrics_for(measurement, config.batch_size, record["weight_bytes"]),
                iterations=[it.to_record() for it in measurement.iterations],
                output_text=measurement.output_text,
                output_token_ids=measurement.output_token_ids,
            )
            memory = measurement.window.memory_figures
            if memory is not None and memory.read_bandwidth_gb_s and record.get("roofline"):
                if memory.raised_from_gb_s:
                    record["roofline"] = with_bandwidth(record["roofline"], memory.host_read_bandwidth_gb_s)
                record["roofline"]["run_read_bandwidth_gb_s"] = memory.read_bandwidth_gb_s
                if 0 < (memory.placement_read_bandwidth_gb_s or 0) < memory.host_read_bandwidth_gb_s:
                    # the CPUs sat where the best read is less than the host's (llmbench.placement)
                    record["roofline"]["placement_read_bandwidth_gb_s"] = memory.placement_read_bandwidth_gb_s
            record["metrics"].update(roofline_metrics(record.get("roofline"),
                                                      record["metrics"]["next_token_latency_s"]))
            record.update(measurement.window.record_fields(record, measurement.complete))
            if run.world_size > 1 and measurement.complete:
                record["tensor_parallel"].update(rank_weight_bytes=gather(world, record["weight_bytes"]),
                                                 rank_peak_memory_bytes=gather(world, measurement.peak_memory_bytes))
            if run.is_main:
                append_or_show(config.results, record,
                               lambda: print_report(record["metrics"], device, config.print_memory))
    if not run.is_main:
        return 0
    print_report(record["metrics"], device, config.print_memory, record.get("roofline"))
    print_run_notes(record, profile_table)
    if not config.quiet:
        print(f"Record appended to {config.results}")
    return 0
