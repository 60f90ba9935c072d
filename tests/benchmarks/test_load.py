"""The load tools against the tiny-model server on loopback: a short headless locust run ends
with zero failures, and benchmarks/serving.py writes its JSON."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.config import ServeConfig
from tests.server.live_server import MODEL_NAME, running_engine, serve

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def live(tiny_checkpoints):
    with (
        running_engine(tiny_checkpoints[1]) as (_, processor, engine),
        serve(ServeConfig(), engine, processor) as server,
    ):
        yield server


def test_headless_locust_run_has_no_failures(live, tmp_path):
    env = {**os.environ, "COGSERVE_MODEL": MODEL_NAME, "COGSERVE_MAX_TOKENS": "8", "COGSERVE_IMAGE_SIZE": "64",
           "COGSERVE_THINK_TIME": "0.1,0.3"}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(ROOT / "benchmarks" / "locustfile.py"), "--headless", "-u", "4",
         "-r", "4", "-t", "15s", "--host", live.url, "--only-summary", "--csv", str(tmp_path / "run")],
        capture_output=True, text=True, env=env, timeout=90,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = {(r["Type"], r["Name"]): r for r in csv.DictReader((tmp_path / "run_stats.csv").open())}
    total = rows[("", "Aggregated")]
    assert int(total["Request Count"]) > 20 and int(total["Failure Count"]) == 0
    kinds = {kind for kind, _ in rows}
    assert {"POST", "TTFT", "E2E"} <= kinds  # latency entries next to the HTTP ones


def test_serving_benchmark_writes_its_json(live, tmp_path):
    out = tmp_path / "serving.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serving.py"), "--base-url", live.url, "--model", MODEL_NAME,
         "--num-prompts", "12", "--request-rate", "8", "--image-size", "64", "--output-len", "6",
         "--result-json", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["completed"] == 12 and report["failed"] == 0
    assert report["total_output_tokens"] == 12 * 6  # ignore_eos: every request makes exactly output-len tokens
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_latency_ms"):
        assert report[metric]["p50"] > 0 and report[metric]["p99"] >= report[metric]["p50"]
    assert report["request_throughput"] > 0 and report["output_throughput"] > 0
