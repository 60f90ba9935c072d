"""gpu_check.sh is what a lent GPU's few minutes run: a typo in it (a moved test, a renamed flag)
would cost a whole device session. Checked here without a GPU."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = (ROOT / "benchmarks" / "gpu_check.sh").read_text()


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], check=True)


def test_every_test_it_names_exists():
    named = re.findall(r"\btests/[\w/]+(?:\.py)?(?:::\w+)?", SCRIPT)
    assert len(named) >= 6
    for item in named:
        path, _, function = item.partition("::")
        assert (ROOT / path).exists(), item
        if function:
            assert f"def {function}(" in (ROOT / path).read_text(), item


@pytest.mark.parametrize("script", sorted(set(re.findall(r"\$PY (benchmarks/[\w/]+\.py)", SCRIPT))))
def test_every_flag_it_passes_a_benchmark_takes(script):
    calls = re.findall(rf"\$PY {re.escape(script)}([^|\n]*)", SCRIPT)
    flags = {flag for call in calls for flag in re.findall(r"(--[\w-]+)", call)}
    done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    for flag in flags:
        assert flag in done.stdout, (script, flag)


def test_the_carried_wheels_match_what_ci_tests():
    """gpu_wheels.sh pins the xgrammar the GPU runs: it must sit inside pyproject's [structured]
    range, the one CI installs, and pin each package once (two versions stop the whole install)."""
    from packaging.specifiers import SpecifierSet

    wheels = (ROOT / "benchmarks" / "gpu_wheels.sh").read_text()
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_wheels.sh")], check=True)
    pins = dict(re.findall(r"^\s+([\w-]+)==([\w.]+)", wheels, re.M))
    names = re.findall(r"^\s+([\w-]+)==", wheels, re.M)
    assert len(names) == len(set(names)) >= 6
    structured = re.search(r'^structured = \["xgrammar([^"]+)"\]', (ROOT / "pyproject.toml").read_text(), re.M)
    assert pins["xgrammar"] in SpecifierSet(structured.group(1))
    assert ".whl" in SCRIPT and "--no-index" in SCRIPT
