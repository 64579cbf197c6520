"""IPEX bf16 and INT4 next to compile bf16, TorchAO INT4 and llama.cpp Q4_1, on the same model, in one run.

    python benchmarks/ipex.py --ipex-python ~/.venvs/llmbench-ipex/bin/python [--no-anchor]

Run from the main environment: the compile and TorchAO cases run here, the IPEX cases in the IPEX environment
(bash setup.sh --ipex DIR) as subprocesses of this script, llama.cpp through the shared anchor script. Every case
holds the shared CPU lock (/tmp/llmbench-cpu.lock) while it is timed, and only then (compiling and IPEX's tracing
happen outside it). Each case's greedy tokens are compared with eager float32's: how many lead in agreement, and
how many agree position by position (each environment against its own eager float32 run: their transformers
releases tokenize the default model's prompt differently).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from woq import add_case_args, cpu_lock, leading_agreement, run_anchor, run_one  # noqa: E402

from llmbench.host import cpu_kind  # noqa: E402
from llmbench.main import quiet_libraries  # noqa: E402

MAIN_CASES = (("fp32", "eager"), ("bf16", "compile"), ("int4", "compile"))  # eager fp32: the tokens' reference
# eager fp32 again in the IPEX environment: transformers 4.51 cuts the prompt into other tokens than the newest
IPEX_CASES = (("fp32", "eager"), ("bf16", "ipex"), ("int4", "ipex"))
LABELS = {("fp32", "eager"): "eager fp32 (reference)", ("bf16", "compile"): "compile bf16",
          ("int4", "compile"): "TorchAO INT4, compile", ("bf16", "ipex"): "IPEX bf16",
          ("int4", "ipex"): "IPEX INT4 (woq)"}


def case_args(args: argparse.Namespace) -> list[str]:
    """This run's case flags, for the IPEX subprocess."""
    out = ["--device", args.device, "--dtype", args.dtype, "--input-tokens", str(args.input_tokens),
           "--max-new-tokens", str(args.max_new_tokens), "--num-iter", str(args.num_iter),
           "--num-warmup", str(args.num_warmup)]
    for flag, value in (("-m", args.model), ("--group-size", args.group_size)):
        if value:
            out += [flag, str(value)]
    return out + (["--no-lock"] if args.no_lock else [])


def run_ipex_cases(args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        done = subprocess.run([args.ipex_python, __file__, "--cases-only", "ipex", "--rows", str(out),
                               *case_args(args)], cwd=ROOT)
        if done.returncode != 0:
            print(f"the IPEX cases failed (exit {done.returncode}): see above", file=sys.stderr)
            return []
        return json.loads(out.read_text())


def run_cases(cases, args, env: str) -> list[dict]:
    rows = []
    for scheme, backend in cases:
        print(f"[{LABELS[(scheme, backend)]}] preparing ...", file=sys.stderr, flush=True)
        row = run_one(scheme, backend, args)
        row["label"] = LABELS[(scheme, backend)] + (" (IPEX env)" if env == "ipex" and backend == "eager" else "")
        row["env"] = env
        row["tokens"] = [int(t) for t in row["tokens"]]  # the first iteration's generated ids
        rows.append(row)
    return rows


def report(rows: list[dict], anchor_ms: float | None) -> None:
    references = {r["env"]: r["tokens"] for r in rows if r["backend"] == "eager"}
    base = next((r["next_ms"] for r in rows if (r["scheme"], r["backend"]) == ("bf16", "compile")), None)
    print(f"\nCPU: {cpu_kind().describe()}")
    print(f"{'case':<26}{'next ms/token':>14}{'vs compile bf16':>17}{'first ms':>10}{'lead agree':>12}"
          f"{'equal':>9}  quantization")
    for r in rows:
        tokens, reference = r["tokens"], references[r["env"]]
        q = r.get("quantization") or {}
        detail = (f"{q.get('library')}, g{q.get('group_size')}" + (f", lowp {q['lowp_mode']}" if "lowp_mode" in q
                                                                    else "")) if q else r["dtype"]
        ratio = f"{base / r['next_ms']:.2f}x" if base else "-"
        equal = sum(a == b for a, b in zip(tokens, reference))
        print(f"{r['label']:<26}{r['next_ms']:>14.2f}{ratio:>17}{r['first_ms']:>10.1f}"
              f"{leading_agreement(tokens, reference):>12}{f'{equal}/{len(reference)}':>9}  {detail}")
    if anchor_ms is not None:
        ratio = f"{base / anchor_ms:.2f}x" if base else "-"
        print(f"{'llama.cpp Q4_1':<26}{anchor_ms:>14.2f}{ratio:>17}{'-':>10}{'-':>12}{'-':>9}  tg after 32 tokens")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_args(p, schemes="", backends="")
    p.add_argument("--ipex-python", default=None, help="the IPEX environment's python (bash setup.sh --ipex DIR)")
    p.add_argument("--no-anchor", action="store_true", help="skip llama.cpp")
    p.add_argument("--cases-only", choices=("ipex",), help=argparse.SUPPRESS)
    p.add_argument("--rows", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    quiet_libraries(verbose=False, no_progress=True)
    if args.cases_only:  # in the IPEX environment, for the parent run
        args.rows.write_text(json.dumps(run_cases(IPEX_CASES, args, "ipex"), default=str))
        return 0
    if not args.ipex_python:
        p.error("--ipex-python is required: the IPEX environment's python (bash setup.sh --ipex DIR)")
    rows = run_cases(MAIN_CASES, args, "main") + run_ipex_cases(args)
    anchor_ms = None
    if not args.no_anchor:
        with cpu_lock(not args.no_lock):
            anchor = run_anchor(args.anchor_allow_busy, args.anchor_script)
        anchor_ms = anchor[0] if anchor else None
    report(rows, anchor_ms)
    return 0 if any(r["backend"] == "ipex" for r in rows) else 1


if __name__ == "__main__":
    from llmbench.allocator import restart_with_allocator

    restart_with_allocator()  # the allocator run_generation.py takes (llmbench/allocator.py)
    sys.exit(main())
