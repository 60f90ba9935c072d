"""`cogserve serve` as a real process: health while loading and ready, SIGTERM draining."""

import json
import signal
import subprocess
import sys
import threading
import time

import httpx

from tests.server.live_server import free_port


def test_sigterm_drains_in_flight_requests_then_exits_zero(tiny_checkpoints):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from server.cli import main; raise SystemExit(main())",
            "serve",
            "--model",
            str(tiny_checkpoints[1]),
            "--port",
            str(port),
            "--served-model-name",
            "tiny",
            "--shutdown-timeout",
            "180",  # the drain's limit, far past the request's end: 1200 tokens took over 20 s on a loaded CI run
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        else:
            raise AssertionError("server never became healthy")
        lines: list[str] = []
        first_token = threading.Event()

        def stream():
            body = {
                "model": "tiny",
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 1200,
                "ignore_eos": True,
                "stream": True,
            }
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=180) as response:
                for line in response.iter_lines():
                    if line:
                        lines.append(line)
                    if '"content": "' in line and '"role"' not in line:
                        first_token.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first_token.wait(60)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert httpx.get(f"{url}/health").status_code == 503  # draining
        refused = httpx.post(
            f"{url}/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]}
        )
        assert refused.status_code == 503 and refused.headers["retry-after"]
        reader.join(180)  # limits here guard against hangs; `make test` runs two workers beside this server
        assert lines[-1] == "data: [DONE]"  # the in-flight request finished
        finish = [json.loads(line[6:]) for line in lines if '"finish_reason": "length"' in line]
        assert finish, "the stream ended without its finish chunk"
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
