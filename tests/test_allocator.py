"""The memory allocator the entry scripts restart with (llmbench/allocator.py): the flag read before anything loads,
the restart in place (same process), the record's account of it, and the refusals. The library expected is whichever
this machine has (bash setup.sh installs jemalloc where it runs as root with apt-get); where it has none, the tests
check the account of that instead."""

import json
import os
import subprocess
import sys

import pytest

from llmbench import allocator
from llmbench.errors import UserError
from tests.conftest import ROOT, error_lines, run_cli

TCMALLOC, JEMALLOC = allocator.find("tcmalloc"), allocator.find("jemalloc")
EXPECTED = "jemalloc" if JEMALLOC else "tcmalloc" if TCMALLOC else "system"


@pytest.mark.parametrize("argv, want", [
    ([], "auto"), (["--allocator", "jemalloc"], "jemalloc"), (["--greedy", "--allocator=system"], "system"),
    (["--allocator", "bogus"], "auto"), (["--allocator"], "auto"), (["--allocator-x", "system"], "auto"),
])
def test_requested_reads_the_flag_before_argparse(argv, want):
    assert allocator.requested(argv) == want


def test_restart_keeps_the_process_and_preloads_the_library():
    """The restart is an exec of the same command: the process id stays, and the new image has the library mapped."""
    code = ("import os, sys; print(os.getpid(), flush=True); from llmbench.allocator import restart_with_allocator, "
            "loaded; restart_with_allocator([]); print(os.getpid(), loaded()[0], "
            "os.environ.get('LLMBENCH_ALLOCATOR_RESTARTED'), os.environ.get('MALLOC_CONF'))")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.RESTARTED, "MALLOC_CONF")}
    for conf in (None, "narenas:2"):  # jemalloc's options: the suite's, or the user's kept
        extra = {"MALLOC_CONF": conf} if conf else {}
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                             env={**env, **extra}, timeout=120, check=True).stdout.split("\n")
        pid = out[0]
        if EXPECTED == "system":  # nothing to restart with: one run, nothing mapped
            assert out[:2] == [pid, f"{pid} system None {conf}"]
        else:  # the first image printed its id, then the restarted one printed the same id twice
            expected_conf = conf or (allocator.JEMALLOC_CONF if EXPECTED == "jemalloc" else None)
            assert out[:3] == [pid, pid, f"{pid} {EXPECTED} {EXPECTED} {expected_conf}"]


def test_the_record_names_the_allocator(tiny_llama, tmp_path):
    results = tmp_path / "r.jsonl"
    common = ["--benchmark", "-m", str(tiny_llama), "--device", "cpu", "--dtype", "float32", "--greedy",
              "--num-iter", "1", "--num-warmup", "0", "--max-new-tokens", "2", "--results", str(results)]
    env = {"LD_PRELOAD": "", allocator.RESTARTED: "", "MALLOC_CONF": ""}
    runs = [run_cli(*common, *extra, env=env) for extra in ([], ["--allocator", "system"])]
    assert [done.returncode for done in runs] == [0, 0], runs[0].stderr + runs[1].stderr
    auto, system = (json.loads(line)["environment"]["allocator"] for line in results.read_text().splitlines())
    assert auto["name"] == EXPECTED
    if EXPECTED == "system":
        assert auto["reason"].startswith("no jemalloc or tcmalloc found") and auto["library"] is None
        assert "note: the C library's malloc" in runs[0].stderr
    else:
        assert auto["reason"] == "preloaded at the entry script's restart (--allocator auto)"
        assert f"lib{EXPECTED}" in auto["library"]
        assert auto.get("malloc_conf") == (allocator.JEMALLOC_CONF if EXPECTED == "jemalloc" else None)
    assert system == {"name": "system", "library": None, "reason": "--allocator system"}


def test_refusals_are_one_line():
    """An allocator asked for by name that the process lacks, and `system` beside a preloaded one."""
    if allocator.loaded()[0] == "system":  # this test process started without one (pytest is no entry script)
        with pytest.raises(UserError, match="--allocator tcmalloc: (this process started without it|no libtcmalloc_)"):
            allocator.state("tcmalloc")
        assert allocator.state("auto")["name"] == "system"
    library = JEMALLOC or TCMALLOC
    if library:
        done = run_cli("--benchmark", "--allocator", "system", env={"LD_PRELOAD": library})
        assert done.returncode == 2
        (line,) = error_lines(done.stderr)
        assert line.startswith(f"run_generation.py: error: --allocator system: this process has {EXPECTED} (/")
        assert line.endswith("), from LD_PRELOAD: unset it")
    else:
        done = run_cli("--benchmark", "--allocator", "jemalloc", env={"LD_PRELOAD": ""})
        assert done.returncode == 2
        assert error_lines(done.stderr)[0].startswith("run_generation.py: error: --allocator jemalloc: no libjemalloc")
