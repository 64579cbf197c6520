"""Run under `mpirun -np 2`: shard each model folder given over the ranks and compare with the unsharded model.

    mpirun -np 2 python tests/tp_check.py OUT.json FOLDER...

For every folder each rank first generates (greedy and beam 4) with the whole model, then shards it as
run_generation_with_deepspeed.py does and generates again; it also records what fraction of every sharded
linear layer's weights this rank holds. Rank 0 writes all ranks' findings to OUT.json.
"""

from __future__ import annotations

import json
import sys

import torch

from llmbench.backends.base import hf_generate
from llmbench.cli import parse_config
from llmbench.distributed import gather, is_sharded, load_sharded
from llmbench.launcher import finish_rank
from llmbench.models import load_model
from llmbench.prompts import cut_prompt
from llmbench.ranks import discover_world, rendezvous

CPU, DTYPE = torch.device("cpu"), torch.float32
INPUT_TOKENS, NEW_TOKENS = 16, 8


def generate_both(model, inputs) -> tuple[list[int], list[int]]:
    greedy = hf_generate(model, inputs, NEW_TOKENS, 1, None)[0, INPUT_TOKENS:].tolist()
    beam = hf_generate(model, inputs, NEW_TOKENS, 4, None)[0, INPUT_TOKENS:].tolist()
    return greedy, beam


def local_weight(module: torch.nn.Module) -> torch.Tensor:
    weight = module.weight
    return weight.to_local() if hasattr(weight, "to_local") else weight


def check(folder: str, world) -> dict:
    config = parse_config(["-m", folder, "--dtype", "float32", "--greedy", "--quiet"])
    whole = load_model(folder, CPU, DTYPE, quiet=True)
    inputs = cut_prompt(whole.tokenizer, INPUT_TOKENS, 1, CPU, None)
    greedy, beam = generate_both(whole.model, inputs)
    full_sizes = {name: m.weight.numel() for name, m in whole.model.named_modules()
                  if isinstance(getattr(m, "weight", None), torch.Tensor)}
    del whole
    loaded, facts = load_sharded(lambda where: load_model(folder, where, DTYPE, quiet=True), config, CPU, DTYPE, world)
    tp_greedy, tp_beam = generate_both(loaded.model, inputs)
    fractions = {name: local_weight(m).numel() / full_sizes[name] for name, m in loaded.model.named_modules()
                 if is_sharded(m) and name in full_sizes}
    return {"family": loaded.model.config.model_type, "method": facts["method"], "greedy": greedy,
            "tp_greedy": tp_greedy, "beam": beam, "tp_beam": tp_beam, "fractions": fractions}


def main() -> None:
    out, folders = sys.argv[1], sys.argv[2:]
    world = rendezvous(discover_world())
    findings = [check(folder, world) for folder in folders]
    everyone = gather(world, findings)
    if world.is_main:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(everyone, f)
    finish_rank(0)  # as run_generation_with_deepspeed.py ends its ranks


if __name__ == "__main__":
    main()
