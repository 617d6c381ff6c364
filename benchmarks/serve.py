"""The guard service under concurrent clients, with and without dynamic batching, against direct library calls.

    python -m benchmarks.serve [--configs tiny:torch,tiny:onnxruntime,vit-b-32:onnxruntime]
                               [--clients 1,8,32] [--seconds 10] [--requests 200] [--out docs/benchmarks]

For each model (benchmarks.inference's prompted artifacts: `tiny` is the reference
architecture, training/model_configs/clipguard-tiny.json, `vit-b-32` a ViT-B/32 with random
weights) and backend (torch: the artifact directory; onnxruntime: its ONNX export), two
services run as `python -m guard serve` child processes, one with dynamic batching
(--max-batch 32, the default wait) and one with --no-batching, and the same PNG files at
the model's input size are classified, with the trigger alert, by

    library        N threads calling Guard.classify(io.BytesIO(png)) on one guard.load in this process
    batching       N clients (threads, one keep-alive HTTP connection each) POSTing to the batching service
    no batching    the same against the service without batching

at N = 1, 8 and 32 concurrent clients, the three modes round-robin per N so that drift on a
busy machine hits all alike. Each client sends at most --requests requests and stops after
--seconds. Reports throughput (images/s), p50 and p99 latency, the mean batch the service
ran (from its /metrics), and errors: any answer other than 200 with the library's result for
the same bytes counts as one (`Classification.agrees_with`: the same label and alert, floats
within 1e-5, since a batch rounds differently from one image on some backends); `exact`
counts the answers whose JSON equals the library's bit for bit. Writes serve.json and serve.md.
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import logging
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

import guard
from benchmarks.inference import MODELS, environment, write_artifacts
from guard.runtime import Classification

log = logging.getLogger("benchmarks.serve")

MODES = ("library", "batching", "no batching")
BACKENDS = ("torch", "onnxruntime")
IMAGES = 16  # distinct files, cycled through by the clients
START_S = 300.0  # the most a service may take to load its model


@dataclass
class Measurement:
    model: str
    backend: str
    mode: str
    clients: int
    requests: int
    errors: int
    exact: int  # answers equal to the library's one-image result bit for bit
    seconds: float
    images_per_s: float
    p50_ms: float
    p99_ms: float
    mean_batch: float | None = None  # images per backend call in the service


def png_files(side: int, count: int = IMAGES) -> list[bytes]:
    """Smooth random pictures at the model's input size, as PNG files."""
    rng = np.random.default_rng(0)
    files = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (side // 4 + 1, side // 4 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((side, side), Image.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        files.append(buffer.getvalue())
    return files


class Service:
    """`python -m guard serve MODEL --port 0 ...` as a child process."""

    def __init__(self, model: Path, *options: str):
        self.process = subprocess.Popen([sys.executable, "-m", "guard", "serve", str(model), "--port", "0",
                                         "--device", "cpu", *options], stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.process.stderr), daemon=True).start()
        deadline = time.monotonic() + START_S
        while not any(line.startswith("serve: ready") for line in self.lines):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the service did not start: {''.join(self.lines)}")
            time.sleep(0.05)
        [port] = [match.group(1) for line in self.lines for match in [re.search(r"127\.0\.0\.1:(\d+)", line)] if match]
        self.port = int(port)

    def batches(self) -> tuple[float, float]:
        """(images, backend calls) so far, from /metrics."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
        connection.close()
        values = {sample.name: sample.value for family in text_string_to_metric_families(text)
                  for sample in family.samples}
        return values.get("clip_guard_batch_size_sum", 0.0), values.get("clip_guard_batch_size_count", 0.0)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _run_clients(clients: int, work, requests: int, seconds: float) -> tuple[list[float], list[str], float]:
    """clients threads each calling work(client, request) -> "exact", "agrees" or "error", at most
    `requests` times and until `seconds` have passed; returns (latencies, outcomes, wall seconds)."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    outcomes: list[list[str]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients + 1)
    deadline = [0.0]

    def client(number: int):
        start.wait()
        for request in range(requests):
            if time.perf_counter() > deadline[0]:
                break
            began = time.perf_counter()
            outcome = work(number, request)
            latencies[number].append(time.perf_counter() - began)
            outcomes[number].append(outcome)

    threads = [threading.Thread(target=client, args=(number,)) for number in range(clients)]
    for thread in threads:
        thread.start()
    deadline[0] = time.perf_counter() + seconds
    began = time.perf_counter()
    start.wait()
    for thread in threads:
        thread.join()
    return ([latency for own in latencies for latency in own], [outcome for own in outcomes for outcome in own],
            time.perf_counter() - began)


def _compare(answer: dict, expected: Classification) -> str:
    if answer == expected.to_dict():
        return "exact"
    return "agrees" if Classification.from_dict(answer).agrees_with(expected) else "error"


def _summary(model, backend, mode, clients, latencies, outcomes, wall, mean_batch=None) -> Measurement:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return Measurement(model, backend, mode, clients, len(latencies), outcomes.count("error"),
                       outcomes.count("exact"), round(wall, 2),
                       round(len(latencies) / wall, 1), round(1000 * statistics.median(ordered), 2),
                       round(1000 * p99, 2), None if mean_batch is None else round(mean_batch, 2))


def measure_library(model, files, expected, clients, requests, seconds):
    def work(client: int, request: int) -> str:
        index = (client * 5 + request) % len(files)
        return _compare(model.classify(io.BytesIO(files[index])).to_dict(), expected[index])
    return _run_clients(clients, work, requests, seconds)


def measure_service(service: Service, files, expected, clients, requests, seconds):
    connections = [http.client.HTTPConnection("127.0.0.1", service.port, timeout=600) for _ in range(clients)]

    def work(client: int, request: int) -> str:
        index = (client * 5 + request) % len(files)
        connection = connections[client]
        connection.request("POST", "/v1/classify", body=files[index],
                           headers={"Content-Type": "application/octet-stream"})
        response = connection.getresponse()
        body = response.read()
        return _compare(json.loads(body), expected[index]) if response.status == 200 else "error"

    try:
        return _run_clients(clients, work, requests, seconds)
    finally:
        for connection in connections:
            connection.close()


def run(configs: list[tuple[str, str]], client_counts: list[int], requests: int, seconds: float,
        max_wait_ms: float | None = None) -> list[Measurement]:
    from export.onnx import export_onnx

    results = []
    for model_name, backend in configs:
        side = MODELS[model_name][1]
        with tempfile.TemporaryDirectory() as scratch:
            scratch = Path(scratch)
            path = write_artifacts(model_name, scratch)["prompted"]
            if backend == "onnxruntime":
                export_onnx(path, scratch / "prompted.onnx", validation_count=2)
                path = scratch / "prompted.onnx"
            files = png_files(side)
            wait = () if max_wait_ms is None else ("--max-wait-ms", str(max_wait_ms))
            services = {"batching": Service(path, "--max-batch", "32", *wait),
                        "no batching": Service(path, "--no-batching")}
            try:
                with guard.load(path, device="cpu") as model:
                    expected = [model.classify(io.BytesIO(blob)) for blob in files]
                    for clients in client_counts:
                        for mode in MODES:
                            # one round of warm-up per mode and client count: threads, connections, caches
                            if mode == "library":
                                measure_library(model, files, expected, clients, 2, seconds)
                                latencies, outcomes, wall = measure_library(model, files, expected, clients, requests,
                                                                            seconds)
                                results.append(_summary(model_name, backend, mode, clients, latencies, outcomes, wall))
                            else:
                                service = services[mode]
                                measure_service(service, files, expected, clients, 2, seconds)
                                before = service.batches()
                                latencies, outcomes, wall = measure_service(service, files, expected, clients,
                                                                            requests, seconds)
                                after = service.batches()
                                calls = after[1] - before[1]
                                mean_batch = (after[0] - before[0]) / calls if calls else None
                                results.append(_summary(model_name, backend, mode, clients, latencies, outcomes, wall,
                                                        mean_batch))
                            log.info("%s", results[-1])
            finally:
                for service in services.values():
                    service.stop()
    return results


def comparisons(results: list[Measurement]) -> list[dict]:
    """Per model, backend and client count: batching over no batching (throughput), and the
    service's p50 latency against the library call's (the issue's bound: 1.2 x library + 5 ms)."""
    index = {(r.model, r.backend, r.mode, r.clients): r for r in results}
    rows = []
    for (model, backend, mode, clients), library in index.items():
        if mode != "library":
            continue
        batching, unbatched = index[(model, backend, "batching", clients)], index[(model, backend, "no batching",
                                                                                    clients)]
        bound = 1.2 * library.p50_ms + 5.0
        rows.append({"model": model, "backend": backend, "clients": clients,
                     "batching_over_no_batching": round(batching.images_per_s / unbatched.images_per_s, 2),
                     "batching_over_library": round(batching.images_per_s / library.images_per_s, 2),
                     "library_p50_ms": library.p50_ms, "batching_p50_ms": batching.p50_ms,
                     "no_batching_p50_ms": unbatched.p50_ms, "p50_bound_ms": round(bound, 2),
                     "batching_p50_within_bound": batching.p50_ms <= bound,
                     "no_batching_p50_within_bound": unbatched.p50_ms <= bound})
    return rows


def markdown(results: list[Measurement], rows: list[dict], env: dict, command: str, note: str) -> str:
    lines = ["# Serving benchmark", "",
             f"`{command}` on {env['cpu']} ({env['threads']} threads), torch {env['torch']}, onnxruntime "
             f"{env['onnxruntime']}. Every request classifies one PNG at the model's input size with the trigger "
             "alert (3 forward rows per image); clients and services on one machine, over the loopback. "
             "`library`: threads calling `Guard.classify` in-process; `batching` / `no batching`: "
             "`python -m guard serve` with `--max-batch 32` / `--no-batching`, one keep-alive connection per client.",
             ""] + ([note, ""] if note else []) + [
             "## Side by side", "",
             "| model | backend | clients | batching / no batching (images/s) | batching / library | library p50 ms "
             "| batching p50 ms | no batching p50 ms | 1.2 x library p50 + 5 ms |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['backend']} | {row['clients']} "
                     f"| {row['batching_over_no_batching']:.2f}x | {row['batching_over_library']:.2f}x "
                     f"| {row['library_p50_ms']:.2f} | {row['batching_p50_ms']:.2f} "
                     f"| {row['no_batching_p50_ms']:.2f} | {row['p50_bound_ms']:.2f} |")
    lines += ["", "## Measurements", "",
              "| model | backend | mode | clients | requests | errors | exact | images/s | p50 ms | p99 ms "
              "| mean batch |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        batch = "–" if r.mean_batch is None else f"{r.mean_batch:.1f}"
        lines.append(f"| {r.model} | {r.backend} | {r.mode} | {r.clients} | {r.requests} | {r.errors} | {r.exact} | "
                     f"{r.images_per_s:.1f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {batch} |")
    return "\n".join(lines) + "\n"


def _configs(text: str) -> list[tuple[str, str]]:
    configs = []
    for item in filter(None, text.split(",")):
        model, _, backend = item.partition(":")
        if model not in MODELS or backend not in BACKENDS:
            raise argparse.ArgumentTypeError(f"{item!r}: expected MODEL:BACKEND with MODEL in {list(MODELS)} and "
                                             f"BACKEND in {list(BACKENDS)}")
        configs.append((model, backend))
    return configs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", type=_configs,
                        default=_configs("tiny:torch,tiny:onnxruntime,vit-b-32:onnxruntime"))
    parser.add_argument("--clients", type=lambda text: [int(n) for n in text.split(",")], default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=200, help="most requests per client and measurement")
    parser.add_argument("--seconds", type=float, default=10.0, help="time limit per measurement")
    parser.add_argument("--max-wait-ms", type=float, default=None, help="the batching service's --max-wait-ms "
                                                                        "(default: the service's default)")
    parser.add_argument("--note", default="", help="a line for the report, e.g. what else ran on the machine")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    given = list(sys.argv[1:] if argv is None else argv)
    if "--note" in given:  # the note is printed as a paragraph of its own, not in the command
        del given[given.index("--note"):given.index("--note") + 2]
    command = shlex.join(["python", "-m", "benchmarks.serve", *given])

    started = time.perf_counter()
    results = run(args.configs, args.clients, args.requests, args.seconds, args.max_wait_ms)
    rows = comparisons(results)
    env = environment()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"environment": env, "command": command, "note": args.note,
              "seconds": round(time.perf_counter() - started, 1), "comparisons": rows,
              "measurements": [asdict(r) for r in results]}
    (args.out / "serve.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(results, rows, env, command, args.note)
    (args.out / "serve.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
