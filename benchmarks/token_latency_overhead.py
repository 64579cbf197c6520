"""What does --token-latency cost? Plain generate() against generate() with the per-token hook, in one run.

Runs both on the same loaded model, interleaved (A, B, A, B, ...) so drift on a shared machine hits both
alike, and prints the end-to-end latency of each and their ratio.

    python benchmarks/token_latency_overhead.py [--dtype bfloat16] [--iters 10] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmbench.cli import RunConfig  # noqa: E402
from llmbench.pipeline import open_pipeline, quiet_libraries  # noqa: E402
from llmbench.timing import StepTimer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model-id", default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--input-tokens", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()

    config = RunConfig(model_id=args.model_id, device="cpu", dtype=args.dtype, num_beams=args.num_beams,
                       input_tokens=args.input_tokens, max_new_tokens=args.max_new_tokens, quiet=True)
    quiet_libraries(verbose=False, no_progress=True)
    run = open_pipeline(config)
    backend, inputs, loaded = run.backend, run.inputs(), run.loaded
    plain_timer = StepTimer(run.device, per_token=False)
    hooked_timer = StepTimer(run.device, per_token=True)

    def once(timer: StepTimer, hooked: bool) -> float:
        timer.start()
        ids = backend.generate(inputs, config.max_new_tokens, config.num_beams, timer if hooked else None)
        return timer.stop(int(ids.shape[1]) - inputs.num_tokens).e2e_latency_s

    for _ in range(2):  # warm-up both paths
        once(plain_timer, False)
        once(hooked_timer, True)
    plain, hooked = [], []
    for _ in range(args.iters):
        plain.append(once(plain_timer, False))
        hooked.append(once(hooked_timer, True))
    p, h = statistics.median(plain), statistics.median(hooked)
    print(f"model {loaded.name}, {config.dtype or args.dtype}, beams {config.num_beams}, "
          f"{config.input_tokens} in / {config.max_new_tokens} new tokens, {args.iters} interleaved iterations")
    print(f"plain generate():             median e2e {p * 1e3:8.2f} ms")
    print(f"generate() + per-token hook:  median e2e {h * 1e3:8.2f} ms")
    print(f"--token-latency overhead: x{h / p:.3f} ({(h - p) / config.max_new_tokens * 1e6:+.0f} us per token)")


if __name__ == "__main__":
    from llmbench.allocator import restart_with_allocator

    restart_with_allocator()  # the allocator run_generation.py takes (llmbench/allocator.py)
    main()
