"""compile: one static KV cache per shape, the prompt's pass and the one-token decode step compiled by torch.compile
(the prompt's pass on cpu; eager elsewhere).

transformers' own compiled generate() recompiles, breaks graphs and (on cpu) skips compiling; a tight loop of our
own over a reused StaticCache, with only the decode step compiled (fullgraph, static shapes) and dynamo's guards
skipped once a shape is compiled, avoids all three; benchmarks/roofline.py measures it beside eager (figures:
docs/measured.md). On cpu, once a shape is compiled and warmed up, each step calls its compiled graph directly
(DirectStep), without dynamo's frame evaluation and input gathering in Python; on cuda it replays the whole step
captured as one CUDA graph (CudaGraphStep), and q/k/v and gate/up are one product each (fused_siblings).
Greedy and beam search both run this loop; beam search reorders the cache in place.

Which kernels the compiled step uses is recorded (`kernels`, `kernels_reason`): on cpu, linears and attention written
so that inductor generates every kernel, or the suite's weight-streaming kernels (backends/generated_kernels.py,
cpu_kernels.py), on every CPU kind measured so far (AVX2 and AVX-512 EPYCs, an AMX Xeon): there the library GEMV
reaches about half the memory bandwidth, oneDNN's AMX GEMMs lose at one token, and the flash-attention kernel's
copies dominate a one-token step. `LLMBENCH_COMPILE_KERNELS=library` keeps the library kernels (oneDNN prepacked
GEMMs with freezing + max-autotune on cpu).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import time

import torch
from transformers import StaticCache

from llmbench.backends import alibi_attention, cpu_kernels, generated_kernels, glu_epilogue
from llmbench.backends.base import Backend, eos_bias, generation_config
from llmbench.backends.compile_settings import (
    GENERATED_LINEAR_MAX_ROWS,
    STEP_MAX_ROWS,
    amx_description,
    choose_kernels,
    compile_guards,
    compile_options,
    direct_entries,
    emulated_gemm,
    inductor_cache_dir,
)
from llmbench.backends.compiled_beams import BeamSearch
from llmbench.backends.direct_steps import CudaGraphStep, DirectStep, StepGraphs
from llmbench.backends.fused_siblings import fuse_for_compile
from llmbench.backends.huge_pages import weights_arena
from llmbench.backends.kernel_linears import (
    NATIVE_PROMPT_ROWS,
    emulated_prompt_rows,
    native_prompt_kinds,
    prompt_pass,
    prompt_rows,
)
from llmbench.backends.static_caches import new_static_cache
from llmbench.devices import synchronize
from llmbench.errors import UserError, exception_name, one_line
from llmbench.prompts import PromptInputs
from llmbench.roofline import head_size
from llmbench.timing import StepTimer

PROMPT_MAX_ROWS = 64  # the longest prompt (tokens x batch) whose pass is compiled (AMX tiles' one call)


class CompileBackend(BeamSearch, Backend):
    name = "compile"
    # lm-eval scores whole sequences of varying length; only the fixed-shape one-token step is compiled, so accuracy
    # runs score the same weights through the plain (eager) module, whose linear layers run the decode step's CPU
    # kernels where the step uses them (prepare_scoring).
    scored_with = "eager"

    def prepare(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype, config) -> None:
        if getattr(type(model), "_supports_static_cache", True) is False:  # transformers 4.x's own flag
            import transformers

            raise UserError(f"--backend compile needs a static KV cache, which {type(model).__name__} lacks in "
                            f"transformers {transformers.__version__}: use --backend eager (or a newer transformers)")
        super().prepare(model, device, dtype, config)
        # Dynamo counts compiled variants per code object, and every backend instance's steps share this class's
        # code: a process that prepares several (accuracy and a benchmark, a test session) would reach torch's
        # default of 8 and, the steps being fullgraph, fail.
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
        self.device, self.dtype = device, dtype
        self.kernels, why = choose_kernels(device, dtype)
        self.mode, self.options = compile_options(device, self.kernels, getattr(config, "compile_mode", None))
        self.details = {"compile_mode": self.mode, "inductor_options": dict(self.options), "kernels": self.kernels,
                        "kernels_reason": why, "inductor_cache_dir": inductor_cache_dir(), "compile_time_s": {}}
        if device.type == "cuda":  # q/k/v and gate/up one product each
            linear = generated_kernels.reduction_or_library(GENERATED_LINEAR_MAX_ROWS) \
                if self.kernels == "generated" else torch.nn.functional.linear
            self.options, self.details["fused_sibling_groups"] = fuse_for_compile(model, self.options, linear)
        self._pick_op = False  # greedy steps pick by llmbench_cpu.argmax_rows (cpu kernels built)
        if self.kernels == "generated" and device.type == "cpu":
            self._use_streaming_kernels(model)
        elif self.kernels == "generated":  # cuda: Triton reductions
            self.details.update(generated_kernels.use_generated(model, GENERATED_LINEAR_MAX_ROWS))
        # Once a shape is compiled, dynamo's guards (a check of every cache tensor, ~2 ms a step on cpu) are skipped:
        # only the token's and position's values change between calls. LLMBENCH_COMPILE_GUARDS=evaluated keeps them.
        self.details["guards_after_warm_up"] = compile_guards()
        self._compiled_shapes: set[tuple[int, int, int]] = set()
        params = inspect.signature(model.forward).parameters
        # transformers >= 5 names the cache argument `cache` and tracks positions inside it; 4.x needs cache_position.
        # Position ids are passed as generate() passes them: models that derive them from the cache's length (OPT,
        # from transformers 5's length tensor) would otherwise slice by a value only known at run time.
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._pass_position = "cache_position" in params
        self._pass_position_ids = "position_ids" in params
        self._position_is_input = self._pass_position or self._pass_position_ids
        self._keep_last_logits = "logits_to_keep" in params  # not in every 4.x model (Bloom)
        eos = generation_config(model, 1, 1).eos_token_id
        eos = [] if eos is None else (eos if isinstance(eos, list) else [eos])
        self._eos = torch.tensor(eos, dtype=torch.long, device=device)
        self._eos_bias = eos_bias(model, eos, device)
        self._caches: dict[tuple[int, int], StaticCache] = {}
        self._allocated: set[int] = set()  # caches whose tensors exist (after an eager prompt: _prefill)
        compile_kwargs = {"fullgraph": True, "dynamic": False}
        self._graphs = StepGraphs(self.options) if device.type == "cpu" else None
        if self._graphs is not None:
            compile_kwargs["backend"] = self._graphs
            self.details["step_calls"] = ("direct: once a shape is compiled and warmed up, each step calls its "
                                          "compiled graph without dynamo's frame evaluation")
        else:
            compile_kwargs["options"] = self.options
        # cuda: one CUDA graph per warmed-up shape (LLMBENCH_CUDA_GRAPHS=0: none, to measure what they save)
        self.whole_step_graphs = device.type == "cuda" and not self.options.get("triton.cudagraphs") and \
            os.environ.get("LLMBENCH_CUDA_GRAPHS", "1") != "0"
        if self.whole_step_graphs:
            self.details["step_calls"] = "one CUDA graph per shape: the whole compiled step, captured after warm-up"
        self._direct_calls: dict[tuple[int, int], DirectStep | CudaGraphStep | None] = {}
        self._graphs_seen: dict[tuple[int, int], set[int]] = {}
        self._calls_direct = False
        self._greedy_step = torch.compile(self._greedy_scores_argmax, **compile_kwargs)
        self._beam_step = torch.compile(self._beam_log_probs, **compile_kwargs)
        # cpu: the prompt's pass compiled too (prompts of up to _prompt_rows rows), a graph per prompt length (eager,
        # the default model's 32-token prompt took ~4x a step); LLMBENCH_COMPILE_PREFILL=0 keeps it eager
        self._compiled_prefill = device.type == "cpu" and os.environ.get("LLMBENCH_COMPILE_PREFILL", "1") != "0"
        self._prompt_rows = prompt_rows(model, PROMPT_MAX_ROWS)
        self.details["prefill"] = (f"compiled up to {self._prompt_rows} rows (tokens x batch), one graph per prompt "
                                   "length; longer prompts eager") if self._compiled_prefill else "eager"
        self._greedy_prefill, self._beam_prefill = (
            (torch.compile(self._prefill_argmax, **compile_kwargs), torch.compile(self._prefill_log_probs,
                                                                                   **compile_kwargs))
            if self._compiled_prefill else (self._greedy_scores_argmax, self._beam_log_probs))
        self._step_names = {id(self._greedy_step): "greedy", id(self._beam_step): "beam",
                            id(self._greedy_prefill): "greedy prompt", id(self._beam_prefill): "beam prompt"}

    def _use_streaming_kernels(self, model: torch.nn.Module) -> None:
        """Linears of steps of up to STEP_MAX_ROWS rows through the suite's weight-streaming kernels (built
        for this host), except, on CPUs where the generated reductions were faster (cpu_kernels.
        dense_one_row_kernels), one-row steps of plain floating-point weights; layers the kernels do not take, or
        every layer where they cannot be built, through the generated reductions (one-row steps only); attention of
        steps of up to 8 rows generated."""
        why_not = cpu_kernels.load() if os.environ.get("LLMBENCH_CPU_KERNELS", "1") != "0" else \
            "LLMBENCH_CPU_KERNELS=0"
        if why_not is None:
            self._pick_op = True
            self.details["greedy_pick"] = "llmbench_cpu.argmax_rows"
            arena = weights_arena()
            self.details["streaming_linears"] = counts = cpu_kernels.use_kernel_linears(
                model, STEP_MAX_ROWS, arena)
            self.details["streaming_weights_memory"] = arena.describe() if arena else \
                "as loaded (LLMBENCH_HUGE_PAGES=0)"
            passes = glu_epilogue.kernel_passes()
            if passes is not None:  # fused siblings' one call per group, and SiLU-and-multiply in gate/up's call
                self.options = {**self.options, "post_grad_custom_pre_pass": passes}
                self.details["gate_up_activation"] = glu_epilogue.describe()
            entries = direct_entries()  # the ops' C entries, which the C++ wrapper calls without the dispatcher
            if entries:
                self.options = {**self.options, "aot_inductor.custom_ops_to_c_shims": entries}
            self.details["kernel_op_calls"] = "direct (C entries)" if entries else "through the dispatcher"
            for kind in set(counts) & set(cpu_kernels.QUANTIZED):
                self.details[f"{kind}_activations"] = cpu_kernels.quantized_activations(kind)
                most = cpu_kernels.quantized_prefill_rows(kind)
                through = f"through the kernels, up to {cpu_kernels.QUANTIZED_CHUNK} rows a call"
                self.details["quantized_prefill"] = f"prompts {through}" if most == sys.maxsize else \
                    f"prompts of up to {most} rows (tokens x batch) {through}; longer ones through TorchAO's kernels"
            emulated = [kind for kind in ("bfloat16", "float16") if kind in counts and emulated_gemm(kind)]
            if emulated:
                most, chunk = emulated_prompt_rows()
                self.details["emulated_prefill"] = (
                    f"torch has no native {' or '.join(emulated)} GEMM here: prompts of up to {most} rows through "
                    f"the kernels, {chunk} a call, longer ones in float32")
            native = [kind for kind in native_prompt_kinds() if kind in counts and not emulated_gemm(kind)]
            if native:  # the library's GEMM is slow at few rows here
                self.details["native_prefill"] = "; ".join(
                    f"{kind} prompts through the kernels, {NATIVE_PROMPT_ROWS[kind][1]} rows a call" +
                    ("" if NATIVE_PROMPT_ROWS[kind][0] == sys.maxsize else
                      f", up to {NATIVE_PROMPT_ROWS[kind][0]} rows (longer ones through the library)")
                    for kind in native)
            amx = amx_description() if "bfloat16" in counts else None
            if amx:
                self.details["amx_tiles"] = amx
            self.details["streaming_prefetch"] = cpu_kernels.prefetch_hint()
            self.details["streaming_schedule"] = cpu_kernels.schedule()
            plain = sorted((cpu_kernels.kind_of(d), d) for d in generated_kernels.PLAIN_DTYPES
                           if cpu_kernels.kind_of(d) in counts)
            self.details["one_row_dense_linears"] = ", ".join(
                f"{kind}: {'kernels' if cpu_kernels.dense_one_row_kernels(dtype) else 'generated reductions'}"
                for kind, dtype in plain) or None
        else:
            self.details["streaming_linears_unavailable"] = why_not
        kernel = generated_kernels.attention_kernel(head_size(model.config), cpu_kernels.attention_vectorized())
        self.details.update(generated_kernels.use_generated(model, GENERATED_LINEAR_MAX_ROWS, kernel))
        if self.details["generated_attention"]:
            self.details["decode_attention"] = "llmbench_cpu.decode_attention" if kernel else "generated"
        elif kernel and alibi_attention.use_alibi_kernel_attention(model):
            self.details["decode_attention"] = "llmbench_cpu.decode_attention (Bloom: ALiBi as a per-head mask)"

    def prepare_scoring(self) -> None:
        """Accuracy runs score through the same linear kernels as the decode step (in chunks they take)."""
        if cpu_kernels.score_with_kernels(self.model):
            self.scored_with = cpu_kernels.SCORED_WITH

    # The forward pass and the logits processing transformers' generate() applies with min_new_tokens ==
    # max_new_tokens: scores in float32, EOS forbidden (so ids match eager generate() exactly in fp32).
    def _last_logits(self, ids: torch.Tensor, cache: StaticCache, position: torch.Tensor) -> torch.Tensor:
        kwargs = {self._cache_arg: cache, "use_cache": True}
        if self._keep_last_logits:
            kwargs["logits_to_keep"] = 1
        if self._pass_position:
            kwargs["cache_position"] = position
        if self._pass_position_ids:
            kwargs["position_ids"] = position.unsqueeze(0).expand(ids.shape[0], -1)
        return self.model(input_ids=ids, **kwargs).logits[:, -1, :]  # in the model's dtype (scores: float32)

    def _forbid_eos(self, scores: torch.Tensor) -> torch.Tensor:
        if not self._eos.numel():
            return scores
        if self._eos_bias is not None and self._eos_bias.shape[0] == scores.shape[-1]:
            return scores + self._eos_bias  # fuses into the argmax's loop (a mask built per step cost 5% of it)
        # A mask of the vocabulary, not index_fill on the scores: torch 2.8 traces index_fill of a strided view (the
        # generated head's output) into a copy that AOT autograd rejects.
        banned = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device).index_fill(0, self._eos, True)
        return scores.masked_fill(banned, float("-inf"))

    def _greedy_scores_argmax(self, ids: torch.Tensor, cache: StaticCache, position: torch.Tensor) -> torch.Tensor:
        logits = self._last_logits(ids, cache, position)
        bias = self._eos_bias if self._eos.numel() else None  # the op adds it; without one that fits, the mask below
        fits = not self._eos.numel() or (bias is not None and bias.shape[0] == logits.shape[-1])
        if self._pick_op and fits:  # one pass over the logits as the head wrote them
            return torch.ops.llmbench_cpu.argmax_rows(logits, bias)
        return self._forbid_eos(logits.float()).argmax(dim=-1, keepdim=True)

    def _beam_log_probs(self, ids: torch.Tensor, cache: StaticCache, position: torch.Tensor) -> torch.Tensor:
        """The step's log-probabilities, or, where beam search's pick normalizes them itself (_beam_ops: the CPU
        kernels' topk_rows), the logits as the head wrote them."""
        logits = self._last_logits(ids, cache, position)
        return logits if self._beam_ops else self._log_probs(logits)

    def _log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        # transformers normalizes first, then masks EOS: the same order keeps the beams identical.
        return self._forbid_eos(torch.log_softmax(logits.float(), dim=-1))

    # The prompt's pass as code of its own, so that dynamo compiles it apart from the one-token steps
    def _prefill_argmax(self, ids: torch.Tensor, cache: StaticCache, position: torch.Tensor) -> torch.Tensor:
        return self._greedy_scores_argmax(ids, cache, position)

    def _prefill_log_probs(self, ids: torch.Tensor, cache: StaticCache, position: torch.Tensor) -> torch.Tensor:
        return self._beam_log_probs(ids, cache, position)

    def _compiles_prompt(self, ids: torch.Tensor) -> bool:
        return self._compiled_prefill and ids.numel() <= self._prompt_rows

    def _prefill(self, step, ids: torch.Tensor, cache: StaticCache, position: torch.Tensor) -> torch.Tensor:
        """Compiled where the prompt has at most _prompt_rows rows (tokens x batch; kernel_linears.prompt_rows: one
        kernel call per linear; longer prompts are bound by their arithmetic more than by the eager pass's
        overhead). A new cache's first prompt runs eagerly: transformers allocates the cache's tensors at its first
        update, and a compiled graph that did so would allocate new ones at every call (once its guards are
        skipped), leaving the decode steps' direct calls on the old ones."""
        if not self._compiles_prompt(ids) or id(cache) not in self._allocated:
            self._allocated.add(id(cache))
            return (self._greedy_scores_argmax if step is self._greedy_prefill else self._beam_log_probs)(
                ids, cache, position)
        with prompt_pass():  # its linears choose as an eager prompt's do
            return self._call_step(step, ids, cache, position)

    def _cache_for(self, rows: int, max_len: int) -> StaticCache:
        """One cache per shape, allocated once and reset between runs (compiled code keeps its addresses)."""
        key = (rows, max_len)
        if key not in self._caches:
            self._caches[key] = new_static_cache(self.model.config, rows, max_len, self.device, self.dtype)
        cache = self._caches[key]
        cache.reset()
        return cache

    def _call_step(self, step, ids: torch.Tensor, cache: StaticCache, position: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda" and self.options.get("triton.cudagraphs"):  # inductor's CUDA graphs
            torch.compiler.cudagraph_mark_step_begin()
            return step(ids, cache, position).clone()  # CUDA graph outputs are overwritten by the next replay
        if self.whole_step_graphs and self._calls_direct:  # cuda: the warmed-up shape's CUDA graph
            key = (id(step), id(cache))
            if key not in self._direct_calls:
                try:
                    self._direct_calls[key] = CudaGraphStep(step, ids, cache, position)
                except RuntimeError as exc:  # not capturable: the step runs as compiled, the record says why
                    self._direct_calls[key] = None
                    self.details["step_calls"] = f"as compiled (CUDA graph capture failed: {one_line(exc)})"
            graph = self._direct_calls[key]
            return step(ids, cache, position) if graph is None else graph(ids, position)
        if self._graphs is None:  # not cpu
            return step(ids, cache, position)
        key = (id(step), id(cache))
        direct = self._direct_calls.get(key)
        if direct is not None and self._calls_direct:
            return direct(ids, position)
        calls_before = self._graphs.calls
        result = step(ids, cache, position)
        last, self._graphs.last = self._graphs.last, None
        if self._graphs.calls != calls_before + 1:  # compiled more than one graph, or none ran
            self._graphs_seen.setdefault(key, set()).add(-1)
            return result
        graph, args, outputs = last
        seen = self._graphs_seen.setdefault(key, set())
        seen.add(id(graph))
        if self._calls_direct and key not in self._direct_calls:
            # Only a shape whose every step so far ran this one graph; only a call whose sole output is the step's.
            one_graph = len(seen) == 1 and len(outputs) == 1 and outputs[0] is result
            fed = position if self._position_is_input else None
            direct = DirectStep.of(graph, args, ids, fed) if one_graph else None
            self._direct_calls[key] = direct
            kind = self._step_names.get(id(step), "?")
            length = next((length for (_, length), c in self._caches.items() if c is cache), "?")
            shape = f"{kind}, {ids.shape[0]} rows, cache of {length}"
            self.details.setdefault("direct_steps", {})[shape] = direct is not None
        return result

    def warm_up_shapes(self, inputs: PromptInputs, max_new_tokens: int, num_beams: int) -> None:
        """Compile for this exact shape now, timed and reported apart (`compile_time_s`, per shape)."""
        key = f"batch{inputs.input_ids.shape[0]}_beams{num_beams}_in{inputs.num_tokens}_new{max_new_tokens}"
        if key in self.details["compile_time_s"]:
            return
        from torch._dynamo.utils import counters

        hits_before, skips_before = counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["cudagraph_skips"]
        synchronize(self.device)
        start = time.perf_counter()
        try:
            for _ in range(2 if self._compiles_prompt(inputs.input_ids) else 1):  # the first allocates the caches
                self.generate(inputs, max_new_tokens, num_beams, None)
        except (UserError, MemoryError, torch.OutOfMemoryError):
            raise
        except Exception as exc:  # the model's code on a static cache, or a torch.compile limitation
            import transformers

            raise UserError(f"--backend compile could not run {type(self.model).__name__} (transformers "
                            f"{transformers.__version__}, torch {torch.__version__}: {exception_name(exc)}: "
                            f"{one_line(exc)}); --backend eager runs it") from exc
        synchronize(self.device)
        self.details["compile_time_s"][key] = time.perf_counter() - start
        self._compiled_shapes.add(self._shape_key(inputs.input_ids, max_new_tokens, num_beams))
        self.details["fx_graph_cache_hits"] = counters["inductor"]["fxgraph_cache_hit"] - hits_before
        if self.mode == "reduce-overhead":  # steps that run without CUDA graphs (inductor logs why)
            self.details["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips_before

    def generate(self, inputs: PromptInputs, max_new_tokens: int, num_beams: int,
                 timer: StepTimer | None = None) -> torch.Tensor:
        self._calls_direct = self._shape_key(inputs.input_ids, max_new_tokens, num_beams) in self._compiled_shapes
        try:
            with torch.inference_mode(), self._guards(inputs.input_ids, max_new_tokens, num_beams):
                if num_beams == 1:
                    return self._greedy(inputs.input_ids, max_new_tokens, timer)
                return self._beam_search(inputs.input_ids, max_new_tokens, num_beams, timer)
        finally:
            self._calls_direct = False

    @staticmethod
    def _shape_key(input_ids: torch.Tensor, max_new_tokens: int, num_beams: int) -> tuple[int, int, int]:
        return input_ids.shape[0] * num_beams, input_ids.shape[1], max_new_tokens

    def _guards(self, input_ids: torch.Tensor, max_new_tokens: int, num_beams: int):
        """Skip guard evaluation for a shape compiled by warm_up_shapes (a new shape still compiles, guarded)."""
        if self.details["guards_after_warm_up"] == "skipped" and \
                self._shape_key(input_ids, max_new_tokens, num_beams) in self._compiled_shapes:
            return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
        return contextlib.nullcontext()

    def _positions(self, start: int, end: int) -> torch.Tensor:
        return torch.arange(start, end, device=self.device)

    def _step_positions(self, length: int, max_new_tokens: int) -> list[torch.Tensor]:
        """Each decode step's position, made before the prompt's pass: made in the step, a `torch.arange` took ~60
        us of a cpu step of the default model (every line it touches evicted by the weights' stream)."""
        return [self._positions(p, p + 1) for p in range(length, length + max_new_tokens - 1)]

    def _greedy(self, input_ids: torch.Tensor, max_new_tokens: int, timer: StepTimer | None) -> torch.Tensor:
        batch, length = input_ids.shape
        cache = self._cache_for(batch, length + max_new_tokens)
        positions = self._step_positions(length, max_new_tokens)
        token = self._prefill(self._greedy_prefill, input_ids, cache, self._positions(0, length))
        tokens = [token]
        if timer is not None:
            timer.step()
        for position in positions:
            token = self._call_step(self._greedy_step, token, cache, position)
            tokens.append(token)
            if timer is not None:
                timer.step()
        return torch.cat([input_ids, *tokens], dim=1)
