"""Two chat models in one `ember serve` (started here, on a free port, with a data directory of its own):

1. load time of each model (the server's own log), and of a deployment's replica;
2. model A's output tok/s at concurrency 8 alone, then while model B serves a steady load (concurrency 4),
   with B's tok/s meanwhile and B alone: how the cores are split between two busy engines;
3. scale from zero: a deployment of A at zero replicas, the time from the first request (503 + retry-after while
   its replica loads, retried at once) to its answer.

Each run has prompts of its own (`seed`), so no run is served from the prefix cache another filled. The JSON lands
in benchmarks/results/multi_model.json.
    usage: .venv/bin/python benchmarks/multi_model.py [--a smollm2-135m-instruct] [--b gemma-3-270m-it]
           [--requests 48] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from ember.bench import run_benchmark

RESULTS = Path(__file__).parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ember serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError("ember serve did not start")


def load_times(log: Path) -> dict[str, float]:
    times = {}
    for line in log.read_text().splitlines():
        if line.startswith("{") and '"model loaded"' in line:
            record = json.loads(line)
            times[record["model"]] = record["seconds"]
    return times


def scale_from_zero(url: str, base: str) -> dict:
    """A deployment of `base`: creation to READY (a replica's load), then from zero to the first answer."""
    api = f"{url}/v1/accounts/bench/deployments"
    created = time.perf_counter()
    httpx.post(api, params={"deploymentId": "bench"}, json={"baseModel": base}, timeout=60).raise_for_status()
    while httpx.get(f"{api}/bench", timeout=10).json()["state"] != "READY":
        time.sleep(0.05)
    ready_s = time.perf_counter() - created
    httpx.patch(f"{api}/bench:scale", json={"replicaCount": 0}, timeout=60).raise_for_status()
    while httpx.get(f"{api}/bench", timeout=10).json()["replicaStats"]["readyReplicaCount"]:
        time.sleep(0.05)
    body = {"model": "accounts/bench/deployments/bench", "max_tokens": 1,
            "messages": [{"role": "user", "content": "Hello"}]}
    started, refusals = time.perf_counter(), 0
    while (r := httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)).status_code == 503:
        refusals += 1
        time.sleep(0.05)
    r.raise_for_status()
    return {"create_to_ready_s": round(ready_s, 2), "scale_from_zero_s": round(time.perf_counter() - started, 2),
            "503s_while_loading": refusals}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", default="smollm2-135m-instruct", help="model A (a bundled name or a path)")
    parser.add_argument("--b", default="gemma-3-270m-it", help="model B, the steady load beside A")
    parser.add_argument("--requests", type=int, default=48, help="A's requests per run")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    report: dict = {}
    with tempfile.TemporaryDirectory() as folder:
        log, port = Path(folder) / "serve.log", free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "ember.cli", "serve", "--port", str(port), "--data-dir", folder,
               "--log-level", "info", "--model", f"a={args.a}", "--model", f"b={args.b}"]
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_healthy(url, proc)
            report["load_s"] = load_times(log)
            common = {"base_url": f"{url}/v1", "max_tokens": args.max_tokens, "ignore_eos": True,
                      "prompt_tokens": 100}
            a_run = {**common, "model": "a", "concurrency": 8, "num_requests": args.requests}
            b_run = {**common, "model": "b", "concurrency": 4, "num_requests": args.requests // 2}
            report["a_alone"] = run_benchmark({**a_run, "seed": 1, "label": "A alone, c=8"})
            report["b_alone"] = run_benchmark({**b_run, "seed": 2, "label": "B alone, c=4"})
            stop, b_runs = threading.Event(), []

            def steady_b() -> None:
                seed = 10
                while not stop.is_set():
                    b_runs.append(run_benchmark({**b_run, "num_requests": 8, "warmup": 0, "seed": seed,
                                                 "label": "B steady"}))
                    seed += 1

            worker = threading.Thread(target=steady_b)
            worker.start()
            time.sleep(3.0)  # B is busy
            report["a_beside_b"] = run_benchmark({**a_run, "seed": 3, "label": "A beside B"})
            stop.set()
            worker.join()
            tokens = sum(r["mean_output_tokens"] * r["requests_ok"] for r in b_runs)
            wall = sum(r["wall_s"] for r in b_runs)
            report["b_beside_a"] = {"output_tokens": tokens, "wall_s": round(wall, 2),
                                    "output_tok_s": round(tokens / wall, 1)}
            report["deployment"] = scale_from_zero(url, "a")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "multi_model.json").write_text(json.dumps(report, indent=2))
    a, a2, b, b2 = (report[k]["output_tok_s"] for k in ("a_alone", "a_beside_b", "b_alone", "b_beside_a"))
    print(f"load: {report['load_s']}  deployment: {report['deployment']}")
    print(f"A alone {a} tok/s, beside B {a2} tok/s ({a2 / a:.2f}x); B alone {b} tok/s, beside A {b2} tok/s "
          f"({b2 / b:.2f}x); A+B together {a2 + b2:.1f} tok/s = {(a2 + b2) / max(a, b):.2f}x the faster one alone")


if __name__ == "__main__":
    main()
