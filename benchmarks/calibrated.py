"""Calibrated INT4 (AutoRound) beside round-to-nearest INT4 on a LAMBADA slice, through the suite's accuracy path.

    python benchmarks/calibrated.py --ipex-python DIR/bin/python --checkpoint ckpt/smollm2-autoround \
        [--calib-iters 200] [--acc-limit 500]

Run from the main environment. Where --checkpoint does not exist yet, AutoRound calibrates it here first
(run_generation.py --woq-algo autoround, on prompt.json unless --calib-dataset says otherwise). Then, in the IPEX
environment (bash setup.sh --ipex DIR), the same accuracy command scores the unquantized model, IPEX's own
round to nearest and the AutoRound checkpoint, all at the same group size and compute precision, and the
table prints each score and its difference from round to nearest's. Nothing here is timed.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmbench.host import cpu_kind  # noqa: E402

LAMBADA = ROOT.parent / "shared" / "data" / "lambada_openai"


def run(python: str, *flags: str) -> subprocess.CompletedProcess:
    print(f"$ {Path(python).name} run_generation.py {' '.join(flags)}", file=sys.stderr, flush=True)
    return subprocess.run([python, str(ROOT / "run_generation.py"), *flags], cwd=ROOT)


def calibrate(args: argparse.Namespace) -> None:
    """AutoRound's checkpoint, made in this (the main) environment: IPEX's lacks auto-round."""
    flags = ["--benchmark", "--greedy", "--dtype", "float32", "--input-tokens", "32", "--max-new-tokens", "1",
             "--num-iter", "1", "--num-warmup", "0", "--woq", "int4", "--woq-algo", "autoround",
             "--calib-dataset", args.calib_dataset, "--woq-checkpoint", str(args.checkpoint),
             "--results", str(args.checkpoint.parent / f"{args.checkpoint.name}.calibration.jsonl")]
    if args.calib_iters:
        flags += ["--calib-iters", str(args.calib_iters)]
    if args.group_size:
        flags += ["--woq-group-size", str(args.group_size)]
    if args.model:
        flags += ["-m", args.model]
    if run(sys.executable, *flags).returncode != 0:
        raise SystemExit("calibrated.py: AutoRound's calibration failed: see above")


def score(args: argparse.Namespace, label: str, case: list[str], results: Path) -> dict | None:
    """One accuracy run in the IPEX environment -> its record (the first task's), or None when it failed."""
    flags = ["--accuracy-only", "--dtype", args.dtype, "--acc-tasks", "lambada_openai", "--acc-data-dir",
             str(args.acc_data_dir), "--acc-limit", str(args.acc_limit), "--acc-batch-size", str(args.acc_batch_size),
             "--ipex", *case, "--results", str(results)]
    if args.model:
        flags += ["-m", args.model]
    print(f"[{label}] scoring ...", file=sys.stderr, flush=True)
    if run(args.ipex_python, *flags).returncode != 0:
        print(f"[{label}] failed: see above", file=sys.stderr)
        return None
    record = [json.loads(line) for line in results.read_text().splitlines()][-1]
    if args.results:
        with args.results.open("a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")
    return record


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ipex-python", required=True, help="the IPEX environment's python (bash setup.sh --ipex DIR)")
    p.add_argument("--checkpoint", type=Path, required=True, help="AutoRound's folder (made first if missing)")
    p.add_argument("-m", "--model", default=None, help="default: the built-in SmolLM2-135M-Instruct")
    p.add_argument("--calib-dataset", default="prompt.json")
    p.add_argument("--calib-iters", type=int, default=None, help="AutoRound's steps per block (default: its own)")
    p.add_argument("--group-size", type=int, default=None, help="INT4 group size (default: the suite's)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--lowp-mode", default="auto", help="IPEX's compute precision for both INT4 cases")
    p.add_argument("--acc-limit", type=int, default=500, help="the first N LAMBADA passages")
    p.add_argument("--acc-batch-size", type=int, default=16)
    p.add_argument("--acc-data-dir", type=Path, default=LAMBADA)
    p.add_argument("--results", type=Path, default=None, help="also append the three accuracy records here")
    args = p.parse_args()
    if not (args.acc_data_dir / "lambada_test.jsonl").is_file():
        p.error(f"--acc-data-dir {args.acc_data_dir} has no lambada_test.jsonl")
    if not args.checkpoint.exists():
        calibrate(args)
    group = ["--woq-group-size", str(args.group_size)] if args.group_size else []
    int4 = ["--woq", "int4", "--woq-lowp-mode", args.lowp_mode, *group]
    cases = [("unquantized", []), ("round to nearest (IPEX)", int4),
             ("AutoRound", [*int4, "--woq-algo", "autoround", "--woq-checkpoint", str(args.checkpoint)])]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, case) in enumerate(cases):
            rows.append((label, score(args, label, case, Path(tmp) / f"{i}.jsonl")))
    print(f"\nCPU: {cpu_kind().describe()}")
    print(f"lambada_openai, first {args.acc_limit} passages, {args.dtype}, IPEX compute precision {args.lowp_mode}")
    print(f"{'case':<26}{'acc':>8}{'± stderr':>10}{'perplexity':>12}{'acc - RTN':>11}  quantization")
    rtn = rows[1][1]
    for label, record in rows:
        if record is None:
            print(f"{label:<26}{'failed':>8}")
            continue
        m, q = record["metrics"], record.get("quantization") or {}
        diff = f"{m['acc'] - rtn['metrics']['acc']:+.4f}" if rtn and q else "-"
        detail = (f"{q.get('algo')}, g{q.get('group_size')}, lowp {q.get('lowp_mode')}, weights from "
                  f"{q.get('weights_from')}") if q else record.get("dtype", "")
        print(f"{label:<26}{m['acc']:>8.4f}{m.get('acc_stderr', math.nan):>10.4f}{m.get('perplexity', math.nan):>12.2f}"
              f"{diff:>11}  {detail}")
    return 0 if all(record is not None for _, record in rows) else 1


if __name__ == "__main__":
    from llmbench.allocator import restart_with_allocator

    restart_with_allocator()  # the allocator run_generation.py takes (llmbench/allocator.py)
    sys.exit(main())
