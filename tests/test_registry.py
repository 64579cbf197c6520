"""A backend registered in one place (llmbench.backends.register) is a --backend choice, runs through the pipeline
into the record, is a value of the sweeps' backend axis and is among the backends benchmarks/backends.py times."""

import importlib.util

import pytest

import llmbench.backends as backends
from llmbench.backends.eager import EagerBackend
from llmbench.cli import build_parser, parse_config
from llmbench.records import read_records
from llmbench.sweep_plan import make_plan
from tests.conftest import ROOT


class ToyBackend(EagerBackend):
    name = "toy"


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(backends, "BACKENDS", dict(backends.BACKENDS))  # the registry is restored afterwards
    backends.register("toy", ToyBackend, overrides=("LLMBENCH_TOY_SPEED",))


def test_a_registered_backend_is_a_cli_choice(toy):
    assert "toy" in build_parser()._option_string_actions["--backend"].choices
    assert parse_config(["--backend", "toy"]).backend == "toy"
    assert make_plan("benchmark", {"backend": "eager toy"}).values["backend"] == ["eager", "toy"]


def test_a_registered_backend_runs_into_the_record(toy, run_main, tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMBENCH_TOY_SPEED", "fast")
    results = tmp_path / "r.jsonl"
    status, _, err = run_main("--benchmark", "-m", str(tiny_llama), "--backend", "toy", "--greedy", "--dtype",
                              "float32", "--input-tokens", "8", "--max-new-tokens", "2", "--num-iter", "1",
                              "--num-warmup", "0", "--quiet", "--results", str(results))
    assert status == 0, err
    [record] = read_records(results)
    assert record["backend"] == record["config"]["backend"] == "toy"
    assert record["backend_overrides"] == {"LLMBENCH_TOY_SPEED": "fast"}  # the override the record states


def test_a_registered_backend_is_benchmarked(toy, capsys):
    spec = importlib.util.spec_from_file_location("benchmark_backends", ROOT / "benchmarks" / "backends.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert "toy" in script.available_backends()


def test_a_backend_option_is_a_config_field_and_an_environment_variable_overrides_it(monkeypatch):
    import torch

    from llmbench.backends.compile_settings import compile_options

    cpu = torch.device("cpu")
    monkeypatch.delenv("LLMBENCH_COMPILE_MODE", raising=False)
    assert compile_options(cpu, "library")[0] == "max-autotune-no-cudagraphs"  # the device's own mode
    config = parse_config(["--backend", "compile", "--compile-mode", "default"])
    assert config.compile_mode == "default" and compile_options(cpu, "library", config.compile_mode)[0] == "default"
    monkeypatch.setenv("LLMBENCH_COMPILE_MODE", "max-autotune")
    assert compile_options(cpu, "library", config.compile_mode)[0] == "max-autotune"
    assert backends.backend_overrides("compile") == {"LLMBENCH_COMPILE_MODE": "max-autotune"}
    assert backends.backend_overrides("eager") == {}


def test_inductor_options_from_the_environment_are_checked_by_name(monkeypatch):
    import torch

    from llmbench.backends.compile_settings import compile_options
    from llmbench.errors import UserError

    cpu = torch.device("cpu")
    monkeypatch.setenv("LLMBENCH_INDUCTOR_OPTIONS", '{"cpp_wrapper": false}')
    assert compile_options(cpu, "generated")[1]["cpp_wrapper"] is False
    monkeypatch.setenv("LLMBENCH_INDUCTOR_OPTIONS", '{"cpp_wraper": false}')
    with pytest.raises(UserError, match="cpp_wraper not an option"):
        compile_options(cpu, "generated")
