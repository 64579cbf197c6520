#!/usr/bin/env python
"""Every model family the suite tests, at the default model's size, through one backend: ms/token and % of the
memory roofline side by side in one run, with which of each family's layers the decode step's own kernels took.

    python benchmarks/families.py                                  # bf16, compile, greedy
    python benchmarks/families.py --families bloom,opt --dtype float32 --num-beams 4

Each family's own transformers architecture (Llama; Phi-3; GPT-J; Qwen2; OPT; Bloom; GLM, ChatGLM3's shape) is built
at the default model's size (hidden 576, 30 layers, heads of 64, a 49152-token vocabulary: the default model's
tokenizer serves every family) with random weights, saved once under $LLMBENCH_CACHE/families/, and timed through
the run_generation.py pipeline (benchmarks/woq.py's run_one: load and compile outside the CPU lock, time inside it).
Families differ in what their steps hold besides the weights (biases, LayerNorm, GELU or ReLU, ALiBi, partial
rotary, parallel attention): a family far below the default model's share of the roofline falls back to a slower
path somewhere, which the kernels column helps find (linears on the streaming kernels, decode attention's op).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts, whatever the working folder
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from woq import cpu_lock, run_one  # noqa: E402

from llmbench.allocator import loaded  # noqa: E402
from llmbench.host import cpu_kind  # noqa: E402
from llmbench.main import quiet_libraries  # noqa: E402
from llmbench.paths import cache_dir  # noqa: E402
from llmbench.roofline import device_bandwidth  # noqa: E402

# The default model's size in each family's own config names (SwiGLU families its 1536-wide MLP, the others their
# usual 4x hidden); GQA where the family has it.
_LLAMA_LIKE = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
               "num_key_value_heads": 3, "max_position_embeddings": 2048}
SHAPES = {
    "llama": ("llama", _LLAMA_LIKE),
    "phi3": ("phi3", {**_LLAMA_LIKE, "num_key_value_heads": 9}),
    "gptj": ("gptj", {"n_embd": 576, "n_layer": 30, "n_head": 9, "rotary_dim": 32, "n_positions": 2048}),
    "qwen2": ("qwen2", _LLAMA_LIKE),
    "opt": ("opt", {"hidden_size": 576, "ffn_dim": 2304, "num_hidden_layers": 30, "num_attention_heads": 9,
                    "word_embed_proj_dim": 576, "max_position_embeddings": 2048}),
    "bloom": ("bloom", {"hidden_size": 576, "n_layer": 30, "n_head": 9}),
    "glm": ("glm", {**_LLAMA_LIKE, "head_dim": 64}),
}


def family_folder(family: str, tokenizer_folder: Path) -> Path:
    """The family's model at the default model's size with random weights (seed 0), saved once."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, shape = SHAPES[family]
    folder = cache_dir() / "families" / family
    if (folder / "config.json").exists():
        return folder
    config = AutoConfig.for_model(model_type, vocab_size=49152, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                                  **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_folder / name, partial / name)
    partial.rename(folder)
    return folder


def kernels_taken(details: dict) -> str:
    """Which of the step's parts ran the suite's kernels, from the backend's details."""
    linears = details.get("streaming_linears") or {}
    counted = sum(v for k, v in linears.items() if k != "fused groups")
    attention = details.get("decode_attention") or "the model's own (compiled)"
    return f"{counted} linears, attention {attention}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--backend", default="compile")
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--input-tokens", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--num-iter", type=int, default=5)
    p.add_argument("--num-warmup", type=int, default=2)
    p.add_argument("--no-lock", action="store_true", help="do not take the CPU lock while timing")
    args = p.parse_args()
    families = args.families.split(",")
    if not families or set(families) - set(SHAPES):
        p.error(f"--families: a comma-separated choice of {', '.join(SHAPES)}")
    quiet_libraries(verbose=False, no_progress=True)
    from llmbench.models import resolve_source

    tokenizer_folder = Path(resolve_source(None, quiet=True)[0])
    print(f"CPU: {cpu_kind().describe()}; {torch.get_num_threads()} threads; torch {torch.__version__}; "
          f"allocator {loaded()[0]}", flush=True)
    with cpu_lock(not args.no_lock):
        gb_s = device_bandwidth(torch.device("cpu"), refresh=True).get("read_bandwidth_gb_s")
    print(f"read bandwidth: {gb_s:.1f} GB/s" if gb_s else "read bandwidth: unknown", flush=True)
    scheme = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[args.dtype]
    run_args = argparse.Namespace(device="cpu", dtype=args.dtype, group_size=None, dummy_weights=False,
                                  input_tokens=args.input_tokens, max_new_tokens=args.max_new_tokens,
                                  num_iter=args.num_iter, num_warmup=args.num_warmup, no_lock=args.no_lock,
                                  num_beams=args.num_beams)
    rows = []
    for family in families:
        print(f"[{family}] preparing ...", file=sys.stderr, flush=True)
        try:
            run_args.model = str(family_folder(family, tokenizer_folder))
            rows.append({"family": family, **run_one(scheme, args.backend, run_args)})
        except Exception as exc:  # noqa: BLE001 - one family's failure must not cost the others' figures
            traceback.print_exc(limit=-3, file=sys.stderr)
            rows.append({"family": family, "error": f"{type(exc).__name__}: {exc}"})
    beams = f"beam {args.num_beams}" if args.num_beams > 1 else "greedy"
    print(f"\n{args.backend}, {args.dtype}, {beams}, {args.input_tokens} in / {args.max_new_tokens} new")
    print(f"{'family':<8}{'ms/token':>10}{'roofline ms':>13}{'% of roofline':>15}{'MB read':>9}  kernels")
    for r in rows:
        if "error" in r:
            print(f"{r['family']:<8}  failed: {r['error']}")
            continue
        roofline_ms = r["bytes_read"] / (gb_s * 1e9) * 1e3 if gb_s else None
        share = f"{roofline_ms / r['next_ms'] * 100:.0f}%" if roofline_ms else "-"
        print(f"{r['family']:<8}{r['next_ms']:>10.2f}{roofline_ms or 0:>13.2f}{share:>15}"
              f"{r['bytes_read'] / 1e6:>9.1f}  {kernels_taken(r.get('details') or {})}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    from llmbench.allocator import restart_with_allocator

    restart_with_allocator()  # the allocator run_generation.py takes (llmbench/allocator.py)
    sys.exit(main())
