"""The compile backend's kernel choice per CPU kind: generated kernels replace every library linear and attention
call inside the decode step, give eager's ids in fp32 (plain and INT8 weights), and the library path still works."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from llmbench.backends import cpu_kernels, generated_kernels, get_backend, kernel_linears
from llmbench.backends.compile_settings import choose_kernels, compile_guards, compile_options
from llmbench.errors import UserError
from llmbench.host import CpuKind
from llmbench.models import load_model
from llmbench.prompts import cut_prompt
from llmbench.roofline import head_size
from tests.compiled_steps import teacher_forced_log_probs

CPU = torch.device("cpu")
INPUT_TOKENS, NEW_TOKENS = 16, 12
LIBRARY_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
               "aten::_scaled_dot_product_attention_math")


@pytest.fixture
def compile_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))


def prepared(model, kernels, monkeypatch, inputs, num_beams):
    monkeypatch.setenv("LLMBENCH_COMPILE_KERNELS", kernels)
    backend = get_backend("compile")
    backend.prepare(model, CPU, next(model.parameters()).dtype, None)
    backend.warm_up_shapes(inputs, NEW_TOKENS, num_beams)
    return backend


def eager_generate(model, inputs, num_beams) -> torch.Tensor:
    eager = get_backend("eager")
    eager.prepare(model, CPU, next(model.parameters()).dtype, None)
    return eager.generate(inputs, NEW_TOKENS, num_beams)


def python_wrapper(monkeypatch):
    """Compiled steps launched from inductor's Python wrapper: its ops go through the dispatcher, which the profiler
    sees (the C++ wrapper calls aten's CPU kernels directly)."""
    monkeypatch.setenv("LLMBENCH_INDUCTOR_OPTIONS", '{"cpp_wrapper": false}')


def library_calls(fn, names=LIBRARY_OPS) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(event.count for event in prof.key_averages() if event.key in names)


@pytest.mark.parametrize("streaming", [True, False])
def test_generated_step_calls_no_library_kernel_and_equals_eager(tiny_llama, compile_env, monkeypatch, streaming):
    num_beams = 1
    python_wrapper(monkeypatch)
    if not streaming:
        monkeypatch.setenv("LLMBENCH_CPU_KERNELS", "0")
    loaded = load_model(str(tiny_llama), CPU, torch.float32)
    inputs = cut_prompt(loaded.tokenizer, INPUT_TOKENS, 1, CPU)
    eager_ids = eager_generate(loaded.model, inputs, num_beams)
    with torch.inference_mode():
        prefill_calls = library_calls(lambda: loaded.model(input_ids=inputs.input_ids.repeat_interleave(num_beams, 0)))
    backend = prepared(loaded.model, "generated", monkeypatch, inputs, num_beams)
    assert backend.details["kernels"] == "generated"
    linears = sum(isinstance(m, torch.nn.Linear) for m in loaded.model.modules())
    if streaming:  # every linear through the suite's CPU kernels
        layers = loaded.model.config.num_hidden_layers
        assert backend.details["streaming_linears"] == {"float32": linears, "fused groups": 2 * layers}
        assert backend.details["generated_linears"] == 0
    else:  # every linear as an inductor-generated reduction
        assert backend.details["streaming_linears_unavailable"] == "LLMBENCH_CPU_KERNELS=0"
        assert backend.details["generated_linears"] == linears
    assert backend.details["generated_attention"] is True
    ids = []
    calls = library_calls(lambda: ids.append(backend.generate(inputs, NEW_TOKENS, num_beams)))
    assert prefill_calls > 0
    # the prompt's (compiled, it may take fewer: a one-row head as a generated reduction); none from the steps
    assert 0 < calls <= prefill_calls
    assert torch.equal(ids[0], eager_ids)
    kernel = streaming and generated_kernels.attention_kernel(  # AVX-512 CPUs: the kernel, every layer
        head_size(loaded.model.config), cpu_kernels.attention_vectorized())
    assert backend.details["decode_attention"] == ("llmbench_cpu.decode_attention" if kernel else "generated")
    attention = library_calls(lambda: backend.generate(inputs, NEW_TOKENS, num_beams),
                              ("llmbench_cpu::decode_attention",))
    assert attention == (loaded.model.config.num_hidden_layers * (NEW_TOKENS - 1) if kernel else 0)
    assert backend.details.get("greedy_pick") == ("llmbench_cpu.argmax_rows" if streaming else None)
    picks = library_calls(lambda: backend.generate(inputs, NEW_TOKENS, num_beams), ("llmbench_cpu::argmax_rows",))
    assert picks == (NEW_TOKENS if streaming else 0)  # the eager prefill's and every compiled step's


@pytest.mark.parametrize("batch", [2, 3])  # beam 4: 8 rows a step, and 12 (passes of 8 over each weight block)
def test_generated_kernels_with_beams_call_no_library_kernel_and_equal_eager(tiny_llama, compile_env, monkeypatch,
                                                                              batch):
    python_wrapper(monkeypatch)
    loaded = load_model(str(tiny_llama), CPU, torch.float32)
    inputs = cut_prompt(loaded.tokenizer, INPUT_TOKENS, batch, CPU)
    eager_ids = eager_generate(loaded.model, inputs, 4)
    with torch.inference_mode():
        prefill_calls = library_calls(lambda: loaded.model(input_ids=inputs.input_ids.repeat_interleave(4, 0)))
    backend = prepared(loaded.model, "generated", monkeypatch, inputs, 4)
    ids = []
    calls = library_calls(lambda: ids.append(backend.generate(inputs, NEW_TOKENS, 4)))
    assert prefill_calls > 0
    # the prompt's library GEMMs and attention at most; the steps' attention is generated too, or the decode kernel
    # (no SDPA, whose CPU path copies the repeated keys and values of grouped-query heads)
    assert 0 < calls <= prefill_calls
    assert torch.equal(ids[0], eager_ids)
    # the streaming kernels, one call per fused q/k/v and gate/up group (the graph keeps one of the members'
    # identical calls)
    layers = loaded.model.config.num_hidden_layers
    linears = sum(isinstance(m, torch.nn.Linear) for m in loaded.model.modules())
    assert backend.details["streaming_linears"]["fused groups"] == 2 * layers
    kernel_calls = library_calls(lambda: backend.generate(inputs, NEW_TOKENS, 4), ("llmbench_cpu::linear_dense",))
    prompt = "float32" in kernel_linears.native_prompt_kinds()  # the prompt's pass through them too (AMD CPUs)
    assert kernel_calls == (linears - 3 * layers) * (NEW_TOKENS - 1 + prompt)


def quantized_step_log_prob_difference(tiny_llama, monkeypatch, scheme: str):
    """-> (backend, |compiled - eager| log-probabilities): the compiled step of `scheme` weights teacher-forced on
    the eager path's own greedy tokens (EOS, forbidden on the compiled path, left out)."""
    from llmbench.cli import parse_config
    from llmbench.quantize import quantize_model

    loaded = load_model(str(tiny_llama), CPU, torch.float32)
    quantize_model(loaded, parse_config(["--woq", scheme, "--quiet"]), CPU, torch.float32)
    inputs = cut_prompt(loaded.tokenizer, INPUT_TOKENS, 1, CPU)
    ids = eager_generate(loaded.model, inputs, 1)
    with torch.inference_mode():
        logits = loaded.model(input_ids=ids[:, :-1]).logits[:, INPUT_TOKENS - 1:].float()
    eager_log_probs = torch.log_softmax(logits, dim=-1)
    backend = prepared(loaded.model, "generated", monkeypatch, inputs, 1)
    compiled = teacher_forced_log_probs(backend, inputs.input_ids, ids[:, INPUT_TOKENS:])
    keep = torch.ones(eager_log_probs.shape[-1], dtype=torch.bool)
    keep[loaded.model.config.eos_token_id] = False
    return backend, (compiled - eager_log_probs)[..., keep].abs()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_step_stays_close_to_torchao_eager(tiny_llama, compile_env, monkeypatch, scheme):
    """The INT4 and INT8 kernels hold TorchAO's weights exactly; on AVX2 they quantize activations to int8 per 32
    values, so their log-probabilities stay close to TorchAO's eager ones, not equal."""
    from llmbench.host import cpu_kind

    backend, difference = quantized_step_log_prob_difference(tiny_llama, monkeypatch, scheme)
    assert backend.details["streaming_linears"][scheme] > 0
    from llmbench.backends import cpu_kernels

    assert backend.details["quantized_prefill"] == {
        "int4": "prompts through the kernels, up to 256 rows a call",
        "int8": f"prompts of up to {cpu_kernels.quantized_prefill_rows('int8')} rows (tokens x batch) through the "
                "kernels, up to 256 rows a call; longer ones through TorchAO's kernels"}[scheme]
    expected = "int8 per 32 values" if "avx2" in cpu_kind().flags else "float32"
    assert backend.details[f"{scheme}_activations"].startswith(expected)
    assert difference.max().item() < 0.05, difference.max().item()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_prompt_of_more_than_8_rows_compiles_with_eager_prompts_ids(tiny_llama, compile_env, monkeypatch,
                                                                              scheme):
    """INT4 and INT8 prompts of 9-64 rows compile too (each kernel linear takes them in one call, so the graph keeps
    one call per fused group): in fp32 the same ids as the prompt run eagerly, and called directly once warmed up."""
    from llmbench.cli import parse_config
    from llmbench.quantize import quantize_model

    runs = {}
    for compiled in ("1", "0"):
        monkeypatch.setenv("LLMBENCH_COMPILE_PREFILL", compiled)
        loaded = load_model(str(tiny_llama), CPU, torch.float32)
        quantize_model(loaded, parse_config(["--woq", scheme, "--quiet"]), CPU, torch.float32)
        inputs = cut_prompt(loaded.tokenizer, INPUT_TOKENS, 2, CPU)  # 32 rows
        backend = prepared(loaded.model, "generated", monkeypatch, inputs, 1)
        runs[compiled] = backend, backend.generate(inputs, NEW_TOKENS, 1)
    backend, ids = runs["1"]
    assert torch.equal(ids, runs["0"][1])
    assert backend.details["prefill"].startswith("compiled up to 64 rows")
    assert backend.details["direct_steps"][f"greedy prompt, 2 rows, cache of {INPUT_TOKENS + NEW_TOKENS}"] is True
    assert runs["0"][0].details["prefill"] == "eager"


def test_library_kernels_still_equal_eager(tiny_llama, compile_env, monkeypatch):
    monkeypatch.setenv("LLMBENCH_COMPILE_MODE", "default")  # the choice is under test, not max-autotune
    loaded = load_model(str(tiny_llama), CPU, torch.float32)
    inputs = cut_prompt(loaded.tokenizer, INPUT_TOKENS, 1, CPU)
    eager_ids = eager_generate(loaded.model, inputs, 1)
    backend = prepared(loaded.model, "library", monkeypatch, inputs, 1)
    assert backend.details["kernels"] == "library" and "generated_linears" not in backend.details
    assert torch.equal(backend.generate(inputs, NEW_TOKENS, 1), eager_ids)


def test_kernel_choice_follows_the_cpu_and_the_override(monkeypatch):
    monkeypatch.delenv("LLMBENCH_COMPILE_KERNELS", raising=False)
    where = "llmbench.backends.compile_settings.cpu_kind"
    monkeypatch.setattr(where, lambda: CpuKind("Xeon", frozenset({"avx2", "amx_bf16"})))
    kernels, why = choose_kernels(CPU, torch.bfloat16)  # AMX's GEMMs lose to generated kernels at one token
    assert kernels == "generated" and "amx_bf16" in why
    assert choose_kernels(CPU, torch.float32)[0] == "generated"
    monkeypatch.setattr(where, lambda: CpuKind("EPYC", frozenset({"avx2", "fma"})))
    assert choose_kernels(CPU, torch.bfloat16)[0] == "generated"
    monkeypatch.setenv("LLMBENCH_COMPILE_KERNELS", "library")
    assert choose_kernels(CPU, torch.bfloat16) == ("library", "LLMBENCH_COMPILE_KERNELS")
    monkeypatch.setenv("LLMBENCH_COMPILE_KERNELS", "fast")
    with pytest.raises(UserError, match="LLMBENCH_COMPILE_KERNELS='fast'"):
        choose_kernels(CPU, torch.bfloat16)


@pytest.mark.parametrize("batch", [4, 12])
def test_bf16_steps_of_several_rows_run_on_amx_tiles_where_the_cpu_has_them(tiny_llama, compile_env, monkeypatch,
                                                                             batch):
    """Batches of 4 and 12 in bf16: the step's linears on AMX tiles on AMX hosts (the record says so), elsewhere the
    vdpbf16ps or widening kernels (12 rows: in passes of 8 over each weight block, compile_settings.STEP_MAX_ROWS);
    either way the teacher-forced log-probabilities stay within bf16 noise of eager's."""
    from tests.test_cpu_kernels_amx import amx_expected

    python_wrapper(monkeypatch)  # kernel calls visible to the profiler
    loaded = load_model(str(tiny_llama), CPU, torch.bfloat16)
    inputs = cut_prompt(loaded.tokenizer, INPUT_TOKENS, batch, CPU)
    ids = eager_generate(loaded.model, inputs, 1)
    with torch.inference_mode():
        logits = loaded.model(input_ids=ids[:, :-1]).logits[:, INPUT_TOKENS - 1:].float()
    backend = prepared(loaded.model, "generated", monkeypatch, inputs, 1)
    rows = amx_expected()
    if rows:
        assert backend.details["amx_tiles"].startswith(f"bf16 linears of {rows}-8 rows (batch x beams) on AMX tiles")
        assert backend.details["amx_tiles"].endswith("so are prefills and steps of up to 64 rows "
                                                     "(LLMBENCH_AMX_MAX_ROWS)")
    else:
        assert "amx_tiles" not in backend.details or backend.details["amx_tiles"].startswith("not used")
    compiled = []
    calls = library_calls(lambda: compiled.append(teacher_forced_log_probs(backend, inputs.input_ids,
                                                                           ids[:, INPUT_TOKENS:])),
                          ("llmbench_cpu::linear_dense",))
    assert calls > 0
    keep = torch.ones(logits.shape[-1], dtype=torch.bool)
    keep[loaded.model.config.eos_token_id] = False
    difference = (compiled[0] - torch.log_softmax(logits, dim=-1))[..., keep].abs()
    assert difference.max().item() < 0.03, difference.max().item()


def test_gpu_steps_take_generated_kernels_only_when_asked_and_keep_guards_only_when_asked(monkeypatch):
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    monkeypatch.delenv("LLMBENCH_COMPILE_KERNELS", raising=False)
    assert choose_kernels(cuda, torch.float16)[0] == "library"
    monkeypatch.setenv("LLMBENCH_COMPILE_KERNELS", "generated")
    assert choose_kernels(cuda, torch.float16) == ("generated", "LLMBENCH_COMPILE_KERNELS")
    for kernels in ("library", "generated"):  # the backend captures whole steps itself, not inductor
        mode, options = compile_options(cuda, kernels)
        assert mode == "default" and not options.get("triton.cudagraphs") and options["coordinate_descent_tuning"]
    with pytest.raises(UserError, match="cpu and cuda"):
        choose_kernels(torch.device("xpu"), torch.float16)
    monkeypatch.delenv("LLMBENCH_COMPILE_GUARDS", raising=False)
    assert compile_guards() == "skipped"
    monkeypatch.setenv("LLMBENCH_COMPILE_GUARDS", "evaluated")
    assert compile_guards() == "evaluated"
    monkeypatch.setenv("LLMBENCH_COMPILE_GUARDS", "sometimes")
    with pytest.raises(UserError, match="LLMBENCH_COMPILE_GUARDS='sometimes'"):
        compile_guards()


@pytest.mark.parametrize("generated", [False, True])
def test_fused_siblings_compile_to_one_product_per_group_with_the_same_logits(tiny_llama, compile_env, generated):
    """What the compile backend does to q/k/v and gate/up on GPUs, compiled here on cpu: each group's weights
    become slices of one tensor (no extra bytes), and the compiled step computes one product per group."""
    import re

    from torch._inductor.utils import run_and_get_code

    from llmbench.backends.fused_siblings import fuse_for_compile
    from llmbench.backends.generated_kernels import reduction_or_library

    model = load_model(str(tiny_llama), CPU, torch.float32).model
    layers = model.config.num_hidden_layers
    ids = torch.tensor([[5]])
    with torch.no_grad():
        expected = model(ids).logits
        size = sum(p.numel() for p in model.parameters())
        linear = reduction_or_library(1) if generated else torch.nn.functional.linear
        options, groups = fuse_for_compile(model, {}, linear)
        assert groups == 2 * layers and sum(p.numel() for p in model.parameters()) == size
        attention = model.model.layers[0].self_attn
        assert attention.k_proj.weight.data_ptr() == attention.q_proj.weight.data_ptr() + \
            attention.q_proj.weight.nbytes
        # eager: each member on its own slice (the BLAS may sum a slice at another alignment in another order, as
        # on an AVX-512 EPYC)
        assert torch.allclose(model(ids).logits, expected, rtol=0, atol=1e-6)
        step = torch.compile(lambda x: model(x).logits, fullgraph=True, options=options)
        logits, code = run_and_get_code(step, ids)
    assert torch.allclose(logits, expected, atol=1e-5)
    products = len(re.findall(r"extern_kernels\.(?:mm|addmm)\(", "\n".join(code)))
    # library: q/k/v, o, gate/up and down per layer, and the head; generated: o and down, the head
    assert products == (2 * layers + 1 if generated else 4 * layers + 1)


def test_the_gpu_script_runs_its_cases_on_a_tiny_model_and_writes_each_as_it_is_measured(tmp_path, cli):
    """benchmarks/gpu_compile.py --tiny (cpu, fp32): every case measured, in the JSON lines, equal to eager."""
    import json

    out = tmp_path / "gpu.jsonl"
    run = cli("--tiny", "--kernels", "generated", "--beams", "1,2", "--max-new-tokens", "6", "--num-iter", "1",
              "--rounds", "1", "--json", str(out), script="benchmarks/gpu_compile.py",
              env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["case"] for row in rows] == [
        "eager greedy", "eager beam 2", "compile/generated greedy, default",
        "compile/generated greedy, compiled calls", "compile/generated greedy, compiled calls, guards on",
        "compile/generated beam 2, default"]
    assert all(row["tokens_equal"] == "6/6 leading" for row in rows[2:])
    assert all(row["next_token_mean_ms"] > 0 and 0 < row["roofline_fraction"] for row in rows)
    assert "default / compiled calls: " in run.stdout
    bad = cli("--beams", "0", script="benchmarks/gpu_compile.py")
    assert bad.returncode == 2 and "beam widths of 1 or more" in bad.stderr and "Traceback" not in bad.stderr


def test_a_steps_small_kernels_run_serially_and_larger_ones_in_parallel(compile_env):
    """cpu steps' norms and adds over a few rows run on one thread (a parallel region costs more than it saves
    there); a prompt's larger ones still take every thread."""
    from torch._inductor.utils import run_and_get_cpp_code

    _, options = compile_options(CPU, "generated")
    threads = torch.get_num_threads()
    try:  # the threshold is the kernel's elements, whatever the threads: per thread, 16384 over them (at least 512)
        torch.set_num_threads(32)
        assert compile_options(CPU, "generated")[1]["cpp.min_chunk_size"] == 512
    finally:
        torch.set_num_threads(threads)

    def add_norm(x, residual, weight):
        h = x + residual
        return weight * (h * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(h.dtype), h

    def code_for(rows: int, opts: dict) -> str:
        torch._dynamo.reset()
        inputs = (*torch.randn(2, rows, 576, dtype=torch.bfloat16).unbind(0), torch.randn(576, dtype=torch.bfloat16))
        step = torch.compile(add_norm, fullgraph=True, dynamic=False, options=opts)
        outputs, code = run_and_get_cpp_code(step, *inputs)
        expected = add_norm(*inputs)
        assert torch.equal(outputs[1], expected[1]) and torch.allclose(outputs[0], expected[0], rtol=0.02)
        return code

    assert "omp parallel" not in code_for(8, options)  # 8 rows x 576: a decode step of batch 8
    assert "omp parallel" in code_for(8, {**options, "cpp.min_chunk_size": 512})  # inductor's default
    assert "omp parallel" in code_for(256, options)  # a 256-token prompt
