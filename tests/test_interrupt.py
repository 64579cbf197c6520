"""Ctrl-C (SIGINT) says truly what was kept: nothing while the model loads, the measured iterations afterwards."""

import json
import signal
import subprocess
import sys

from llmbench.records import read_records
from tests.conftest import ROOT, error_lines

# run_generation.py, with loading held up until the test has interrupted it
SLOW_LOAD = """
import sys, time
import llmbench.pipeline as pipeline
from llmbench.main import main
real_load = pipeline.load
def slow_load(*args, **kwargs):
    print("loading", flush=True)
    time.sleep(120)
    return real_load(*args, **kwargs)
pipeline.load = slow_load
sys.exit(main(sys.argv[1:], prog="run_generation.py"))
"""


def test_interrupted_while_loading_says_nothing_was_recorded(tmp_path, tiny_llama):
    results = tmp_path / "r.jsonl"
    earlier = {"model": "earlier", "metrics": {}}
    results.write_text(json.dumps(earlier) + "\n")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_LOAD, "--benchmark", "-m", str(tiny_llama), "--greedy",
                             "--input-tokens", "8", "--max-new-tokens", "4", "--num-iter", "2", "--results",
                             str(results)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "loading\n"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert error_lines(stderr) == ["run_generation.py: interrupted; nothing was recorded"]
    assert read_records(results) == [earlier]
