"""Command-line flags, defined once for every entry script, and the validated RunConfig."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmbench.allocator import CHOICES as ALLOCATORS
from llmbench.backends import COMPILE_MODES, backend_names
from llmbench.errors import UserError

DTYPES = ("float16", "bfloat16", "float32")
DEVICES = ("auto", "cpu", "cuda", "xpu")
WOQ_SCHEMES = ("int4", "int8")
DEFAULT_RESULTS = Path("results") / "results.jsonl"
DEFAULT_ACC_TASK = "lambada_openai"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported on one line (no usage block) with exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def positive_int(text: str) -> int:
    value = non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


@dataclass
class RunConfig:
    """Everything a run needs, validated; flows one way through the pipeline. The defaults here are the flags'
    defaults: RunConfig(backend="compile") is what `--backend compile` alone parses to (dataclasses.replace makes
    variants)."""

    mode: str = "benchmark"  # benchmark | accuracy
    model_id: str | None = None  # None: the built-in default model
    device: str = "auto"
    dtype: str | None = None  # None: chosen for the device (llmbench.devices.choose_dtype)
    backend: str = "eager"
    num_beams: int = 4
    batch_size: int = 1
    input_tokens: int = 32
    max_new_tokens: int = 32
    num_iter: int = 10
    num_warmup: int = 3
    token_latency: bool = False
    prompt: str | None = None
    prompt_file: Path | None = None
    seed: int = 42
    print_memory: bool = False
    results: Path = DEFAULT_RESULTS
    quiet: bool = False
    trust_remote_code: bool = False
    dummy_weights: bool = False
    woq: str | None = None
    woq_group_size: int | None = None
    woq_algo: str = "rtn"
    calib_dataset: str | None = None
    woq_checkpoint: Path | None = None
    ki: bool = False
    calib_iters: int | None = None  # AutoRound tuning steps per block; None: its default
    woq_lowp_mode: str = "auto"  # --ipex --woq: IPEX's lowest compute precision
    trust_checkpoint_pickle: bool = False
    acc_tasks: list[str] = field(default_factory=lambda: [DEFAULT_ACC_TASK])
    acc_limit: int | None = None
    acc_batch_size: int = 1
    acc_data_dir: Path | None = None
    profile: Path | None = None
    compile_mode: str | None = None  # --backend compile's torch.compile mode; None: the device's (docs/backends.md)
    allocator: str = "auto"  # the memory allocator the entry script restarts with (llmbench.allocator)

    def to_record(self) -> dict:
        """The settings that were asked for, JSON-ready (the record's `config`)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, Path):
                out[key] = str(value)
        return out


DEFAULTS = RunConfig()


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=prog,
        allow_abbrev=False,  # a prefix such as --num-bea would slip past the sweeps' check of the flags they own
        description="Time (--benchmark) or evaluate (--accuracy-only) text generation of a causal LM.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    mode = p.add_argument_group("mode")
    mode.add_argument("--benchmark", action="store_true", help="time generation (the default mode)")
    mode.add_argument("--accuracy-only", action="store_true", help="run lm-eval tasks instead of timing")

    model = p.add_argument_group("model")
    model.add_argument("-m", "--model-id", default=DEFAULTS.model_id,
                       help="hub id, local model folder or .gguf file; default: the built-in SmolLM2-135M-Instruct")
    model.add_argument("--device", choices=DEVICES, default=DEFAULTS.device, help="auto picks xpu, then cuda, then cpu")
    model.add_argument("--dtype", choices=DTYPES, default=DEFAULTS.dtype,
                       help="default: float16 on cuda/xpu; on cpu what the CPU runs natively (bf16, fp16, fp32)")
    model.add_argument("--trust-remote-code", action="store_true",
                       help="allow running Python code shipped with a checkpoint")
    model.add_argument("--dummy-weights", action="store_true",
                       help="random weights at the real size (no download): timing only")

    gen = p.add_argument_group("generation")
    gen.add_argument("--num-beams", type=positive_int, default=DEFAULTS.num_beams)
    gen.add_argument("--greedy", action="store_true", help="greedy search (same as --num-beams 1)")
    gen.add_argument("--batch-size", type=positive_int, default=DEFAULTS.batch_size)
    gen.add_argument("--input-tokens", type=positive_int, default=DEFAULTS.input_tokens,
                     help="prompt length in tokens, cut exactly from prompt.json")
    gen.add_argument("--max-new-tokens", type=positive_int, default=DEFAULTS.max_new_tokens,
                     help="tokens generated per run (exactly this many: EOS never ends a run early)")
    gen.add_argument("--prompt", default=DEFAULTS.prompt,
                     help="your own prompt text instead of prompt.json (used whole)")
    gen.add_argument("--prompt-file", type=Path, default=DEFAULTS.prompt_file, help="prompt.json to cut prompts from")
    gen.add_argument("--seed", type=int, default=DEFAULTS.seed)

    bench = p.add_argument_group("benchmark")
    bench.add_argument("--num-iter", type=positive_int, default=DEFAULTS.num_iter, help="measured iterations")
    bench.add_argument("--num-warmup", type=non_negative_int, default=DEFAULTS.num_warmup,
                       help="warm-up iterations (not measured)")
    bench.add_argument("--token-latency", action="store_true",
                       help="time every generated token (first and next-token latency)")
    bench.add_argument("--print-memory", action="store_true", help="print peak memory")
    bench.add_argument("--results", type=Path, default=DEFAULTS.results, help="JSONL file records are appended to")
    bench.add_argument("--quiet", action="store_true", help="no progress bars or generated text")
    bench.add_argument("--profile", type=Path, default=DEFAULTS.profile, metavar="DIR",
                       help="after the measured iterations, profile one more generation (torch.profiler): "
                            "Perfetto/Chrome trace and top-operators table written to DIR")

    opt = p.add_argument_group("optimization")
    opt.add_argument("--backend", choices=backend_names(), default=DEFAULTS.backend)
    opt.add_argument("--ipex", action="store_true", help="same as --backend ipex")
    opt.add_argument("--woq", choices=WOQ_SCHEMES, default=DEFAULTS.woq, help="weight-only quantization")
    opt.add_argument("--woq-group-size", type=positive_int, default=DEFAULTS.woq_group_size,
                     help="quantization group size")
    opt.add_argument("--woq-algo", choices=("rtn", "gptq", "awq", "autoround"), default=DEFAULTS.woq_algo)
    opt.add_argument("--calib-dataset", default=DEFAULTS.calib_dataset,
                     help="calibration text/JSONL file or dataset name (gptq, awq, autoround)")
    opt.add_argument("--calib-iters", type=positive_int, default=DEFAULTS.calib_iters,
                     help="AutoRound tuning steps per block (--woq-algo autoround; default 200)")
    opt.add_argument("--woq-lowp-mode", choices=("auto", "none", "fp16", "bf16", "int8"),
                     default=DEFAULTS.woq_lowp_mode,
                     help="--ipex --woq: IPEX's lowest compute precision (auto: int8 for int4 weights, else bf16)")
    opt.add_argument("--woq-checkpoint", type=Path, default=DEFAULTS.woq_checkpoint,
                     help="low-precision checkpoint: saved after quantizing, loaded when it exists")
    opt.add_argument("--trust-checkpoint-pickle", action="store_true",
                     help="load a --woq-checkpoint whose pickle needs more than tensors (can run code it holds)")
    opt.add_argument("--compile-mode", choices=COMPILE_MODES, default=DEFAULTS.compile_mode,
                     help="torch.compile mode of --backend compile (default: chosen per device and CPU kind)")
    opt.add_argument("--allocator", choices=ALLOCATORS, default=DEFAULTS.allocator,
                     help="memory allocator: auto takes jemalloc, else tcmalloc, where installed (the entry script "
                          "restarts with it preloaded); system keeps the C library's malloc")
    opt.add_argument("--ki", action="store_true", help="DeepSpeed kernel injection (distributed runs)")
    opt.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)

    acc = p.add_argument_group("accuracy")
    acc.add_argument("--acc-tasks", default=",".join(DEFAULTS.acc_tasks), help="comma-separated lm-eval tasks")
    acc.add_argument("--acc-limit", "--acc-iter", type=positive_int, default=DEFAULTS.acc_limit,
                     help="evaluate only the first N documents of each task")
    acc.add_argument("--acc-batch-size", type=positive_int, default=DEFAULTS.acc_batch_size, help="lm-eval batch size")
    acc.add_argument("--acc-data-dir", type=Path, default=DEFAULTS.acc_data_dir,
                     help="folder holding lambada_test.jsonl (offline lambada_openai)")
    return p


def parse_config(argv: list[str] | None = None, prog: str | None = None) -> RunConfig:
    """Parse flags into a RunConfig; contradictions become a UserError."""
    args = build_parser(prog).parse_args(argv)
    if args.benchmark and args.accuracy_only:
        raise UserError("--benchmark and --accuracy-only are two different runs: pass one of them")
    if args.ipex and args.backend not in ("eager", "ipex"):
        raise UserError(f"--ipex means --backend ipex, which contradicts --backend {args.backend}: pass one")
    backend = "ipex" if args.ipex else args.backend
    tasks = [t.strip() for t in args.acc_tasks.split(",") if t.strip()]
    if args.accuracy_only and not tasks:
        raise UserError("--acc-tasks is empty: name at least one lm-eval task, e.g. --acc-tasks lambada_openai")
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("--prompt is empty: give some text, or drop the flag to use prompt.json")
    if args.profile is not None:
        if args.accuracy_only:
            raise UserError("--profile profiles a benchmark run: drop it with --accuracy-only")
        from llmbench.profiling import check_folder  # (torch: the sweeps parse flags without it)

        check_folder(args.profile)
    if args.woq is None and (args.woq_checkpoint or args.woq_group_size or args.calib_dataset):
        raise UserError("--woq-checkpoint/--woq-group-size/--calib-dataset need --woq int4 or --woq int8")
    if args.woq is None and (args.calib_iters or args.woq_lowp_mode != "auto"):
        raise UserError("--calib-iters/--woq-lowp-mode need --woq int4 or --woq int8")
    if args.woq_lowp_mode != "auto" and backend != "ipex":
        raise UserError("--woq-lowp-mode sets IPEX's compute precision: pass --ipex, or drop it")
    if args.calib_iters and args.woq_algo != "autoround":
        raise UserError("--calib-iters applies to --woq-algo autoround: pass both, or drop it")
    if args.trust_checkpoint_pickle and args.woq_checkpoint is None:
        raise UserError("--trust-checkpoint-pickle applies to --woq-checkpoint: pass both, or drop it")
    return RunConfig(
        mode="accuracy" if args.accuracy_only else "benchmark",
        model_id=args.model_id,
        device=args.device,
        dtype=args.dtype,
        backend=backend,
        num_beams=1 if args.greedy else args.num_beams,
        batch_size=args.batch_size,
        input_tokens=args.input_tokens,
        max_new_tokens=args.max_new_tokens,
        num_iter=args.num_iter,
        num_warmup=args.num_warmup,
        token_latency=args.token_latency,
        prompt=args.prompt,
        prompt_file=args.prompt_file,
        seed=args.seed,
        print_memory=args.print_memory,
        results=args.results,
        quiet=args.quiet,
        trust_remote_code=args.trust_remote_code,
        dummy_weights=args.dummy_weights,
        woq=args.woq,
        woq_group_size=args.woq_group_size,
        woq_algo=args.woq_algo,
        calib_dataset=args.calib_dataset,
        woq_checkpoint=args.woq_checkpoint,
        ki=args.ki,
        calib_iters=args.calib_iters,
        woq_lowp_mode=args.woq_lowp_mode,
        trust_checkpoint_pickle=args.trust_checkpoint_pickle,
        acc_tasks=tasks,
        acc_limit=args.acc_limit,
        acc_batch_size=args.acc_batch_size,
        acc_data_dir=args.acc_data_dir,
        profile=args.profile,
        compile_mode=args.compile_mode,
        allocator=args.allocator,
    )
