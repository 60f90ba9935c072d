"""benchmarks/api_overhead.py runs (a few requests: its numbers are for the benchmark; this keeps
it from rotting). Through completions: its chat path is the default and shares all else."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_benchmark_runs(endpoint="completions"):
    done = subprocess.run([sys.executable, "benchmarks/api_overhead.py", "--endpoint", endpoint, "--requests", "3",
                           "--tokens", "5"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{endpoint}: server cost per request" in done.stdout and "per streamed token" in done.stdout
