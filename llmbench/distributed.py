"""Tensor-parallel runs: join the ranks' process group and shard the model over them (DeepSpeed AutoTP, or
transformers' own plan), keep their generations in step, gather their figures. llmbench.ranks finds the ranks and
llmbench.launcher starts each one.
"""

from __future__ import annotations

import datetime as dt
import gc
import importlib
import os
import sys
import time
from collections.abc import Callable

import torch

from llmbench.backends.base import Backend
from llmbench.errors import UserError, one_line
from llmbench.families import TP_PLAN_FAMILIES, autotp_fixups
from llmbench.models import DEFAULT_MODEL_NAME, load_model, resolve_source
from llmbench.prompts import cut_prompt, synthetic_prompt
from llmbench.ranks import World, share_cpu_cores
from llmbench.tp_heads import (
    AUTOTP,
    TP_PLAN,
    describe_counts,
    head_counts,
    plan_splits_heads,
    whole_heads,
    working_rank_counts,
)
from llmbench.tp_layers import plain_linears

DIST_BACKEND = {"cpu": "gloo", "cuda": "nccl", "xpu": "xccl"}
TIMEOUT_ENV = "LLMBENCH_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0
SHM_ENV = "LLMBENCH_DS_SHM_ALLREDUCE"
SHM_OP = "deepspeed_shm_comm"
PROBE_TOKENS = 16


def timeout_s() -> float:
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        return float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise UserError(f"{TIMEOUT_ENV}={text!r}: expected a number of seconds") from None


def init_process_group(world: World, device: torch.device) -> None:
    """Join the job's process group with the device's backend; every collective is bounded by the timeout."""
    import torch.distributed as tdist

    if tdist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(world.local_rank)
    elif device.type == "xpu":
        torch.xpu.set_device(world.local_rank)
    if device.type == "cpu":
        share_cpu_cores(world)
    backend = DIST_BACKEND[device.type]
    if device.type == "xpu" and not tdist.is_backend_available("xccl"):
        backend = "ccl"  # oneCCL bindings for PyTorch register "ccl" (older torch has no xccl)
        import oneccl_bindings_for_pytorch  # noqa: F401
    tdist.init_process_group(backend, rank=world.rank, world_size=world.size,
                             timeout=dt.timedelta(seconds=timeout_s()))


def rank_device(device: torch.device, world: World) -> torch.device:
    return device if device.type == "cpu" else torch.device(device.type, world.local_rank)


def _checkpoint_config(config):
    """The model's transformers config, read without its weights; None for dummy weights or when it cannot be read
    (the loader then reports the problem in its own words)."""
    if config.dummy_weights:
        return None
    from transformers import AutoConfig

    where, _, _ = resolve_source(config.model_id, quiet=True)
    try:
        return AutoConfig.from_pretrained(where, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError):
        return None


def check_tp_plan_heads(model_config, config, ranks: int, why: str) -> None:
    """transformers' tensor-parallel plan splits most families' attention heads evenly: refuse, naming the rank
    counts that work, where it would leave a rank part of a head (which fails at the attention reshape)."""
    heads, splits = head_counts(model_config), plan_splits_heads(model_config)
    if heads is None or whole_heads(heads, ranks, TP_PLAN, splits):
        return
    counts = working_rank_counts(heads, TP_PLAN, splits)
    raise UserError(f"-m {config.model_id or DEFAULT_MODEL_NAME} has {heads}: {why} transformers' tensor-parallel "
                    f"plan, which cannot give each of {ranks} ranks whole heads; run it on {describe_counts(counts)} "
                    f"rank{'' if counts == [1] else 's'}")


def _probe_ids(loaded, device: torch.device) -> torch.Tensor:
    """A few tokens of ordinary text (prompt.json) to compare the sharded and unsharded outputs on: arbitrary ids
    (control tokens) drive some models' activations so high that bf16 rounding alone moves the logits by more than
    the tolerance, which would reject a correct split."""
    if loaded.tokenizer is not None:
        try:
            return cut_prompt(loaded.tokenizer, PROBE_TOKENS, 1, device).input_ids
        except UserError:
            pass  # a tokenizer that makes fewer tokens of the whole text: random ids below
    vocab = int(getattr(loaded.model.config, "vocab_size", 0) or 64)
    return synthetic_prompt(vocab, PROBE_TOKENS, 1, device).input_ids


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        # with the attention mask, as generate() passes it (Bloom builds its head-sharded alibi only from a mask)
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().cpu()


def _agrees(tp: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> bool:
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    return tp.shape == ref.shape and bool((tp - ref).abs().max() <= tolerance * max(1.0, float(ref.abs().max())))


def shm_allreduce_wanted(compiled: bool = False) -> bool:
    """DeepSpeed's shared-memory all-reduce for CPU ranks on one node: faster than gloo (docs/distributed.md),
    but compiled on first use (~70 s on 2 cores, needs g++ and ninja). LLMBENCH_DS_SHM_ALLREDUCE=1 uses it
    (compiling it if need be), =0 keeps gloo; unset, it is used where it is already compiled. In `compiled` decode
    steps (--backend compile) only where inductor keeps ops marked as having side effects (keep_shm_allreduce)."""
    choice = os.environ.get(SHM_ENV, "").strip()
    if choice and choice not in ("0", "1"):
        raise UserError(f"{SHM_ENV}={choice!r}: expected 1 (use DeepSpeed's shared-memory all-reduce) or 0 (gloo)")
    if compiled and not inductor_keeps_marked_ops():
        if choice == "1":
            raise UserError(f"{SHM_ENV}=1: torch {torch.__version__}'s inductor may drop DeepSpeed's all-reduce from "
                            "compiled steps; unset it (gloo) or use --backend eager")
        return False
    if choice:
        return choice == "1"
    try:
        from torch.utils.cpp_extension import _get_build_directory

        folder = _get_build_directory(SHM_OP, verbose=False)
    except (ImportError, OSError, RuntimeError):
        return False
    return os.path.isfile(os.path.join(folder, f"{SHM_OP}.so"))


def inductor_keeps_marked_ops() -> bool:
    """Whether inductor keeps ops marked as having side effects (torch._library.utils.is_impure; not in torch 2.8)."""
    return hasattr(importlib.import_module("torch._library.utils"), "is_impure")


def keep_shm_allreduce() -> None:
    """Mark DeepSpeed's shared-memory all-reduce ops as having side effects, for compiled steps. Inductor otherwise
    takes the op (out of place once functionalized) for a pure function and drops it with dead code: with the
    2-layer test Llama on two ranks, rank 1's output head gets no columns of the final hidden state, so its step lost
    the last layer and that layer's two all-reduces (5 calls on rank 0, 3 on rank 1), and rank 0 waited forever."""
    ops = torch.ops.deepspeed  # a namespace whether or not DeepSpeed registered the ops
    for name in ("inference_all_reduce", "inference_all_reduce_"):
        if hasattr(ops, name):
            torch.fx.node.has_side_effect(getattr(ops, name).default)


def autotp(model: torch.nn.Module, dtype: torch.dtype, world: World, device: torch.device, ki: bool,
           plain: bool = True, shm: bool = False, compiled: bool = False):
    """Shard with DeepSpeed AutoTP (kernel injection only with --ki); -> the sharded model (still a
    transformers model, so generate() with beam search works on it). plain=False keeps DeepSpeed's own layers
    (what ipex.llm.optimize recognises and quantizes, all-reduce included). On cpu, `shm` (shm_allreduce_wanted)
    takes DeepSpeed's shared-memory all-reduce, else gloo; `compiled` steps keep it (keep_shm_allreduce)."""
    import deepspeed

    if device.type == "cpu" and not shm:
        # (the package attribute deepspeed.comm.torch is the torch library, hence sys.modules)
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": world.size}, dtype=dtype,
                                      replace_with_kernel_inject=ki)
    if compiled and shm:
        keep_shm_allreduce()
    autotp_fixups(engine.module)
    if plain:
        plain_linears(engine.module)
    return engine.module


def load_with_tp_plan(config, dtype: torch.dtype):
    """Sharded loading by transformers' own tensor-parallel plan (llmbench.models.load_model with tp_plan)."""
    if config.dummy_weights:
        raise UserError("this model family needs transformers' tensor-parallel plan, which loads real weights: "
                        "drop --dummy-weights")
    return load_model(config.model_id, torch.device("cpu"), dtype, config.trust_remote_code, quiet=True,
                      tp_plan=True)


def is_sharded(module: torch.nn.Module) -> bool:
    """True for a linear layer split over ranks (AutoTP's, as converted by plain_linears or left as DeepSpeed's,
    or a DTensor-sharded weight)."""
    from deepspeed.module_inject.layers import TensorParallel_Layer

    weight = getattr(module, "weight", None)
    return getattr(module, "tp_sharded", False) or isinstance(module, TensorParallel_Layer) or (
        type(weight).__name__ == "DTensor") or (
        weight is not None and type(getattr(weight, "data", None)).__name__ == "DTensor")


def load_sharded(load: Callable[[torch.device], object], config, device: torch.device, dtype: torch.dtype,
                 world: World):
    """Load the model and shard it over the ranks -> (LoadedModel, facts for the record).

    A rank count at which no method gives every rank whole attention heads is refused before loading.
    AutoTP first: the model is built on the CPU, checked against its unsharded output, then sharded
    (DeepSpeed moves each shard to the rank's device and the full copy is freed at once). Families that
    AutoTP splits wrongly, or any model whose sharded output disagrees, go to transformers' tensor-parallel
    plan, which loads only this rank's shard (and needs head counts that divide by the ranks); rank 0 says so.
    """
    if config.ki and device.type == "cpu":
        raise UserError("--ki (DeepSpeed kernel injection) needs a GPU: drop --ki on cpu")
    device = rank_device(device, world)
    compiled = config.backend == "compile"
    init_process_group(world, device)
    shm = device.type == "cpu" and shm_allreduce_wanted(compiled)
    facts: dict = {"world_size": world.size, "launcher": world.launcher,
                   "cpu_allreduce": ("deepspeed-shm" if shm else "gloo") if device.type == "cpu" else None}
    model_config = _checkpoint_config(config)
    family = getattr(model_config, "model_type", None)
    if family in TP_PLAN_FAMILIES:  # refused before any weights are read
        check_tp_plan_heads(model_config, config, world.size, f"{family} models are sharded by")
    loaded, method, reason = None, None, None
    if family not in TP_PLAN_FAMILIES:
        loaded = load(torch.device("cpu"))
        model_config = loaded.model.config
        family = getattr(model_config, "model_type", None)
    heads = head_counts(model_config)
    if family in TP_PLAN_FAMILIES:
        check_tp_plan_heads(model_config, config, world.size, f"{family} models are sharded by")  # dummy weights
        reason = f"AutoTP splits {family}'s fused projections with the unsharded head count"
    elif heads is not None and not whole_heads(heads, world.size, AUTOTP):
        reason = f"AutoTP cannot split {heads} into whole heads"
    else:
        ids = _probe_ids(loaded, torch.device("cpu"))
        reference = _logits(loaded.model, ids) if device.type == "cpu" else None
        start = time.perf_counter()
        try:
            loaded.model = autotp(loaded.model, dtype, world, device, config.ki, plain=config.backend != "ipex",
                                  shm=shm, compiled=compiled)
            sharded = _logits(loaded.model, ids.to(device))
            if reference is None or _agrees(sharded, reference, dtype):
                method = AUTOTP + ("-kernel-inject" if config.ki else "")
            else:
                reason = "AutoTP output differs from the unsharded model's"
        except (RuntimeError, ValueError, AssertionError) as exc:
            reason = f"AutoTP failed: {one_line(exc)}"
        facts["shard_time_s"] = time.perf_counter() - start
    if not all(gather(world, method is not None)):  # the ranks must agree, or they would wait on each other
        method, reason = None, reason or "AutoTP failed on another rank"
    if method is None:
        check_tp_plan_heads(model_config, config, world.size, f"{reason}; the fallback is")
        loaded = None
        gc.collect()
        loaded = load_with_tp_plan(config, dtype)  # each rank reads only its shard
        method = TP_PLAN
        facts["cpu_allreduce"] = "gloo" if device.type == "cpu" else None  # transformers calls torch.distributed
        if world.is_main:  # the record says so too, but a changed method changes what is timed
            print(f"note: sharded with transformers' tensor-parallel plan, not DeepSpeed AutoTP: {reason}",
                  file=sys.stderr, flush=True)
    elif heads is not None and heads.key_value < world.size and world.is_main:
        print(f"note: AutoTP splits the attention by key/value heads, and {heads.key_value} of them leave "
              f"{world.size - heads.key_value} of the {world.size} ranks without attention heads",
              file=sys.stderr, flush=True)
    facts.update(method=method, fallback_reason=reason)
    gc.collect()
    facts["sharded_linear_layers"] = sum(is_sharded(m) for m in loaded.model.modules())
    return loaded, facts


def gather(world: World, value) -> list:
    """Every rank's `value`, in rank order, on every rank (a collective: all ranks must call it)."""
    import torch.distributed as tdist

    values = [None] * world.size
    tdist.all_gather_object(values, value)
    return values


def barrier(world: World) -> None:
    import torch.distributed as tdist

    if world.size > 1:
        tdist.barrier()


class RankSynchronized(Backend):
    """A backend whose every generation ends at a barrier, so each timed iteration starts with the ranks
    together and rank 0's wall time covers the slowest rank."""

    def __init__(self, inner: Backend, world: World):
        super().__init__()
        self.inner, self.world = inner, world
        self.name, self.model = inner.name, inner.model

    @property
    def details(self) -> dict:  # type: ignore[override]
        return self.inner.details

    @details.setter
    def details(self, value: dict) -> None:
        pass  # Backend.__init__ assigns it; the inner backend owns it

    @property
    def scored_with(self) -> str:  # type: ignore[override]
        return self.inner.scored_with

    def prepare_scoring(self) -> None:
        self.inner.prepare_scoring()

    def warm_up_shapes(self, inputs, max_new_tokens: int, num_beams: int) -> None:
        self.inner.warm_up_shapes(inputs, max_new_tokens, num_beams)
        barrier(self.world)

    def generate(self, inputs, max_new_tokens: int, num_beams: int, timer=None) -> torch.Tensor:
        ids = self.inner.generate(inputs, max_new_tokens, num_beams, timer)
        barrier(self.world)
        return ids
