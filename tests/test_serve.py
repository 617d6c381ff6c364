"""The guard HTTP service (guard.serve) and its client (guard.client.ServiceClient), run for real on
127.0.0.1: served answers equal the library's for the same bytes, under concurrency and with
dynamic batching; bad requests get a 4xx JSON error and serving goes on; /healthz, /metrics
after traffic with alerts, and `python -m guard serve` with its exit codes and a graceful
SIGTERM. Request loops are bounded in count and time; nothing here asserts a duration."""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import smooth_images
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from test_bad_inputs import jpeg_claiming, png_claiming

import guard
from guard.calibration import calibrate
from guard.client import ServiceClient, encode_image
from guard.errors import ArtifactError, InputError, ServiceError
from guard.runtime import Classification
from guard.serve import GuardService, ServeConfig, create_app
from guard.serve.app import listen

ROOT = Path(__file__).resolve().parent.parent
CLIENTS, REQUESTS_PER_CLIENT = 8, 50
BAD_EVERY = 10  # every 10th request of a client sends bytes that are no image
WAIT_S = 60.0   # the most any loop here waits for a server to come up, load or stop

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def calibrated(tiny_artifact, tmp_path_factory) -> Path:
    """The tiny artifact calibrated at 10 % false alarms on smooth images: the noise images below
    alert and most smooth ones do not, so the served alerts and their metrics have both outcomes."""
    path = Path(shutil.copytree(tiny_artifact.path, tmp_path_factory.mktemp("calibrated") / "purified"))
    calibrate(path, list(smooth_images(100, seed=1)), fpr=0.1, device="cpu")
    return path


@pytest.fixture(scope="module")
def blobs() -> list[bytes]:
    """Distinct image files: smooth 40 x 40 PNGs, noise PNGs of several sizes, a JPEG and a grey PNG."""
    arrays = [(image.permute(1, 2, 0) * 255).byte().numpy() for image in smooth_images(8, seed=2, side=40)]
    rng = np.random.default_rng(0)
    arrays += [rng.integers(0, 256, (30 + 3 * index, 40, 3), dtype=np.uint8) for index in range(6)]
    files = [_encoded(Image.fromarray(array), "PNG") for array in arrays]
    files.append(_encoded(Image.fromarray(arrays[9]), "JPEG", quality=90))
    files.append(_encoded(Image.fromarray(arrays[1][:, :, 0]), "PNG"))
    return files


@pytest.fixture(scope="module")
def library(calibrated, blobs) -> list[Classification]:
    """What guard.load(...).classify returns for each file, one call per image."""
    with guard.load(calibrated, device="cpu") as model:
        results = [model.classify(io.BytesIO(blob)) for blob in blobs]
    alerts = sum(result.alert for result in results)
    assert 0 < alerts < len(results), "the test images should alert and not alert"
    return results


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@contextlib.contextmanager
def running(service: GuardService):
    """The service under uvicorn in a thread, on a free port of 127.0.0.1; yields its URL once
    the model is loaded (or has failed to load), and stops it gracefully afterwards."""
    import uvicorn

    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(service), lifespan="on", log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        wait_for(lambda: server.started, "the server to start")
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=WAIT_S)
        sock.close()
    assert not thread.is_alive(), "the server did not stop"


def wait_for(condition, what: str, limit: float = WAIT_S):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    pytest.fail(f"gave up waiting for {what} after {limit:.0f} s")


def ready(url: str) -> bool:
    return httpx.get(url + "/healthz").status_code == 200


def serving(path: Path, **config) -> GuardService:
    return GuardService(lambda: guard.load(path, device="cpu"), ServeConfig(**config))


def post_image(url: str, blob: bytes, content_type="application/octet-stream", client=httpx):
    """POST one image file; client: an httpx.Client, or the httpx module (one connection)."""
    return client.post(url + "/v1/classify", content=blob, headers={"content-type": content_type})


def metrics(url: str) -> dict:
    """{(sample name, frozenset of labels): value} read from GET /metrics."""
    text = httpx.get(url + "/metrics").text
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


# --- answers ------------------------------------------------------------------------------

def test_concurrent_clients_get_the_library_results_and_bad_bytes_get_400(calibrated, blobs, library):
    """8 clients x 50 requests on the loopback: every image answer equals the library's result
    for the same bytes (up to float rounding: served images share a batch, which rounds
    differently from one image on some backends), bad bytes among them are answered 400 and the
    next request is served; /metrics then counts the requests, errors, batches and alerts."""
    mismatches, failures = [], []
    start = threading.Barrier(CLIENTS)

    with running(serving(calibrated)) as url:
        wait_for(lambda: ready(url), "the model to load")

        def client(number: int):
            with httpx.Client(timeout=WAIT_S) as http:
                start.wait(timeout=WAIT_S)
                for request in range(REQUESTS_PER_CLIENT):
                    if request % BAD_EVERY == BAD_EVERY - 1:
                        response = post_image(url, b"\x89PNG\r\n\x1a\n but not an image", client=http)
                        if response.status_code != 400 or response.json()["error"] != "bad_image":
                            failures.append((number, request, response.status_code, response.text))
                        continue
                    index = (number * 7 + request) % len(blobs)
                    response = post_image(url, blobs[index], "image/png", client=http)
                    if response.status_code != 200:
                        failures.append((number, request, response.status_code, response.text))
                    elif not Classification.from_dict(response.json()).agrees_with(library[index]):
                        mismatches.append((number, request, index))

        threads = [threading.Thread(target=client, args=(number,)) for number in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=4 * WAIT_S)
        assert not any(thread.is_alive() for thread in threads), "a client hung"
        samples = metrics(url)

    assert not failures, failures[:3]
    assert not mismatches, f"{len(mismatches)} answers differ from the library, first {mismatches[0]}"
    bad = CLIENTS * (REQUESTS_PER_CLIENT // BAD_EVERY)
    good = CLIENTS * REQUESTS_PER_CLIENT - bad
    assert value(samples, "clip_guard_requests_total", endpoint="/v1/classify", status="200") == good
    assert value(samples, "clip_guard_requests_total", endpoint="/v1/classify", status="400") == bad
    assert value(samples, "clip_guard_request_errors_total", reason="bad_image") == bad
    assert value(samples, "clip_guard_request_latency_seconds_count", endpoint="/v1/classify") == good + bad
    # every served image went through exactly one backend call, alerts counted by outcome
    assert value(samples, "clip_guard_batch_size_sum") == good
    served = [(number * 7 + request) % len(blobs) for number in range(CLIENTS) for request in range(REQUESTS_PER_CLIENT)
              if request % BAD_EVERY != BAD_EVERY - 1]
    raised = sum(library[index].alert for index in served)
    assert 0 < raised < good
    assert value(samples, "clip_guard_images_total", statistic="pr_terms", alert_status="alert") == raised
    assert value(samples, "clip_guard_images_total", statistic="pr_terms", alert_status="clear") == good - raised
    assert value(samples, "clip_guard_model_loaded") == 1


def test_a_json_batch_and_the_client_return_the_library_results(calibrated, blobs, library):
    with running(serving(calibrated)) as url:
        wait_for(lambda: ready(url), "the model to load")
        # one request at a time: each runs as one batch, as the library's list call does, so the
        # floats are equal too (JSON keeps them exactly)
        with guard.load(calibrated, device="cpu") as model:
            as_lists = [model.classify([io.BytesIO(blob) for blob in blobs[start:start + 5]])
                        for start in range(0, len(blobs), 5)]
            whole = model.classify([io.BytesIO(blob) for blob in blobs])
        response = httpx.post(url + "/v1/classify", json={"images": [base64.b64encode(b).decode() for b in blobs]})
        assert response.status_code == 200
        assert response.json() == {"results": [result.to_dict() for result in whole]}
        with ServiceClient(url, batch_size=5) as client:  # 4 requests of at most 5 images
            assert client.classify(list(blobs)) == [result for chunk in as_lists for result in chunk]
            assert client.classify(blobs[3]) == library[3]
            assert client.health()["status"] == "ready"
        assert all(served.agrees_with(alone) for served, alone in zip(whole, library))
        samples = metrics(url)
    assert value(samples, "clip_guard_requests_total", endpoint="/v1/classify", status="200") == 1 + 4 + 1


def test_the_client_sends_every_kind_of_image_as_the_library_reads_it(calibrated, tmp_path):
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (36, 28, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (30, 30), dtype=np.uint8)
    path = tmp_path / "image.png"
    Image.fromarray(rgb).save(path)
    rgba = Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (36, 28), dtype=np.uint8)]), "RGBA")
    cmyk = Image.fromarray(rgb).convert("CMYK")
    items = [path, str(path), open(path, "rb"), Image.fromarray(rgb), rgba, cmyk, rgb, grey, grey[:, :, None],
             torch.from_numpy(rgb).permute(2, 0, 1).contiguous(), path.read_bytes()]
    with guard.load(calibrated, device="cpu") as model, running(serving(calibrated)) as url:
        wait_for(lambda: ready(url), "the model to load")
        with ServiceClient(url) as client:
            for item in items:
                if isinstance(item, bytes):
                    expected = model.classify(io.BytesIO(item))
                else:
                    expected = model.classify(item)
                assert client.classify(item) == expected, type(item).__name__
            with pytest.raises(InputError, match="would be rounded"):
                client.classify(rgb.astype(np.float32) / 255)
            with pytest.raises(InputError, match=r"input 1: .*empty"):
                client.classify([path, b""])
            with pytest.raises(InputError, match="answered 400: .*holds no image"):
                client.classify(b"not an image")
    items[2].close()


def test_results_agree_up_to_rounding_only(library):
    result = library[0]
    nudged = list(result.probs)
    nudged[0] += 1e-7
    assert result.agrees_with(dataclasses.replace(result, probs=tuple(nudged)))
    nudged[0] += 1e-3
    assert not result.agrees_with(dataclasses.replace(result, probs=tuple(nudged)))
    assert not result.agrees_with(dataclasses.replace(result, alert=not result.alert, alert_status="other"))
    assert not result.agrees_with(dataclasses.replace(result, alert_score=result.alert_score + 1e-3))
    assert Classification.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_an_unreachable_service_is_a_service_error():
    sock = listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    with ServiceClient(f"http://127.0.0.1:{port}", timeout=5) as client:
        with pytest.raises(ServiceError, match="cannot reach the guard service"):
            client.classify(b"x")


def test_encode_image_refuses_what_it_cannot_send_losslessly():
    with pytest.raises(InputError, match="mode F"):
        encode_image(Image.new("F", (4, 4)))
    with pytest.raises(InputError, match="cannot send a list"):
        encode_image([1, 2])
    with pytest.raises(InputError, match="HxW, HxWx1 or HxWx3"):
        encode_image(np.zeros((4, 4, 4), np.uint8))


# --- refusals -----------------------------------------------------------------------------

def _chunks(data: bytes, size: int = 1000):
    for start in range(0, len(data), size):
        yield data[start:start + size]


LIMIT = 4096  # the refusal tests' --max-body-bytes
REFUSALS = {
    # name: (keyword arguments of httpx.post, status, reason, text in the message)
    "bytes that are no image": (dict(content=b"GIF89a garbage", headers={"content-type": "image/gif"}),
                                400, "bad_image", "holds no image Pillow can read"),
    "a truncated PNG": (dict(content=png_claiming(40, 40)[:40], headers={"content-type": "image/png"}),
                        400, "bad_image", "request body"),
    "an empty body": (dict(content=b"", headers={"content-type": "application/octet-stream"}),
                      400, "empty_body", "the body is empty"),
    "a body over the limit": (dict(content=b"\0" * (LIMIT + 1), headers={"content-type": "image/png"}),
                              413, "body_too_large", "4,097 bytes, more than this service accepts (4,096"),
    "a chunked body over the limit": (dict(content=_chunks(b"\0" * (3 * LIMIT)), headers={"content-type": "image/png"}),
                                      413, "body_too_large", "more than 4,096 bytes"),
    "a PNG bomb (9000 x 9000)": (dict(content=png_claiming(9000, 9000), headers={"content-type": "image/png"}),
                                 400, "bad_image", "81,000,000 pixels, more than clip-guard accepts"),
    "a JPEG bomb (60000 x 60000)": (dict(content=jpeg_claiming(60000, 60000), headers={"content-type": "image/jpeg"}),
                                    400, "bad_image", "too large to decode safely"),
    "another content type": (dict(content=b"x", headers={"content-type": "text/plain"}),
                             415, "unsupported_media_type", "application/octet-stream"),
    "JSON that is not JSON": (dict(content=b"{images", headers={"content-type": "application/json"}),
                              400, "bad_json", "not valid JSON"),
    "JSON without images": (dict(json={"image": []}), 400, "bad_json", '{"images": ['),
    "an empty image list": (dict(json={"images": []}), 400, "no_images", "at least one image"),
    "too many images": (dict(json={"images": ["AA=="] * 5}), 413, "too_many_images", "5 images in one request"),
    "bad base64": (dict(json={"images": ["AA==", "%%%"]}), 400, "bad_base64", "images[1] is not the base64"),
    "a bad image in a batch": (dict(json={"images": [base64.b64encode(b"junk").decode()]}), 400, "bad_image",
                               "images[0]"),
}


@pytest.fixture(scope="module")
def strict_server(calibrated):
    with running(serving(calibrated, max_body_bytes=LIMIT, max_images=4)) as url:
        wait_for(lambda: ready(url), "the model to load")
        yield url


@pytest.mark.parametrize("name", REFUSALS)
def test_a_bad_request_gets_a_4xx_json_error_and_serving_goes_on(strict_server, blobs, library, name):
    arguments, status, reason, text = REFUSALS[name]
    before = metrics(strict_server)
    response = httpx.post(strict_server + "/v1/classify", timeout=WAIT_S, **arguments)
    assert response.status_code == status, response.text
    assert response.json()["error"] == reason and text in response.json()["message"], response.json()
    after = metrics(strict_server)
    assert value(after, "clip_guard_request_errors_total", reason=reason) == \
        value(before, "clip_guard_request_errors_total", reason=reason) + 1
    served = post_image(strict_server, blobs[0])
    assert served.status_code == 200 and served.json() == library[0].to_dict()


def test_unknown_paths_and_methods_get_json_errors(strict_server):
    response = httpx.get(strict_server + "/v2/classify")
    assert response.status_code == 404 and response.json()["error"] == "not_found"
    response = httpx.get(strict_server + "/v1/classify")
    assert response.status_code == 405 and "POST /v1/classify" in response.json()["message"]


# --- batching -----------------------------------------------------------------------------

@pytest.mark.parametrize("batching", [True, False])
def test_concurrent_requests_share_one_backend_call_with_dynamic_batching(calibrated, blobs, library, batching):
    """4 requests at once with max_batch 4 and a long max_wait: one call of 4 images; without
    batching, 4 calls of one. The answers are the library's either way."""
    answers, start = {}, threading.Barrier(4)
    with running(serving(calibrated, max_batch=4, max_wait_ms=10_000, batching=batching)) as url:
        wait_for(lambda: ready(url), "the model to load")

        def send(index: int):
            with httpx.Client(timeout=WAIT_S) as http:
                start.wait(timeout=WAIT_S)
                answers[index] = post_image(url, blobs[index], client=http).json()

        threads = [threading.Thread(target=send, args=(index,)) for index in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=2 * WAIT_S)
        samples = metrics(url)
    assert all(Classification.from_dict(answers[index]).agrees_with(library[index]) for index in range(4))
    assert value(samples, "clip_guard_batch_size_sum") == 4
    assert value(samples, "clip_guard_batch_size_count") == (1 if batching else 4)
    assert value(samples, "clip_guard_batch_size_bucket", le="1.0") == (0 if batching else 4)


# --- health and loading -------------------------------------------------------------------

def test_healthz_answers_503_until_the_model_is_loaded(calibrated, blobs, library):
    gate = threading.Event()

    def load_when_released():
        assert gate.wait(timeout=WAIT_S)
        return guard.load(calibrated, device="cpu")

    with running(GuardService(load_when_released)) as url:
        response = httpx.get(url + "/healthz")
        assert response.status_code == 503 and response.json()["status"] == "loading"
        response = post_image(url, blobs[0])
        assert response.status_code == 503 and response.json()["error"] == "not_ready"
        assert value(metrics(url), "clip_guard_model_loaded") == 0
        gate.set()
        wait_for(lambda: ready(url), "the model to load")
        health = httpx.get(url + "/healthz").json()
        assert health["status"] == "ready" and health["alert_threshold"] == library[0].threshold
        assert post_image(url, blobs[0]).json() == library[0].to_dict()


def test_a_model_that_does_not_load_is_reported(calibrated, tmp_path, blobs):
    damaged = Path(shutil.copytree(calibrated, tmp_path / "damaged"))
    weights = damaged / "prompts.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    service = serving(damaged)
    reported = []
    service.on_load_error = reported.append
    with running(service) as url:
        wait_for(lambda: reported, "the load to fail")
        response = httpx.get(url + "/healthz")
        assert response.status_code == 503 and response.json()["status"] == "failed"
        assert "prompts.safetensors" in response.json()["error"]
        response = post_image(url, blobs[0])
        assert response.status_code == 503 and "did not load" in response.json()["message"]
    assert isinstance(reported[0], ArtifactError)


# --- the command line ---------------------------------------------------------------------

def start_cli(*arguments) -> tuple[subprocess.Popen, list[str]]:
    """`python -m guard serve ...` in a child process; stderr lines are collected by a thread."""
    process = subprocess.Popen([sys.executable, "-m", "guard", "serve", *map(str, arguments)], cwd=ROOT,
                               stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True).start()
    return process, lines


def cli_url(process: subprocess.Popen, lines: list[str]) -> str:
    """The URL the child listens on, once it says the model is loaded."""
    wait_for(lambda: any(line.startswith("serve: ready") for line in lines) or process.poll() is not None,
             "the service to load its model")
    assert process.poll() is None, "".join(lines)
    [port] = [match.group(1) for line in lines for match in [re.search(r"http://127\.0\.0\.1:(\d+)", line)] if match]
    return f"http://127.0.0.1:{port}"


def test_sigterm_lets_the_request_in_flight_finish(calibrated, blobs, library):
    """A request whose body is half sent when SIGTERM arrives is still answered, correctly; the
    server stops accepting connections, then exits 0 once it has answered."""
    # one torch thread, as the library's answers were computed: other thread counts round differently
    process, lines = start_cli(calibrated, "--port", "0", "--device", "cpu", "--torch-threads", "1")
    try:
        url = cli_url(process, lines)
        host, port = url.removeprefix("http://").split(":")
        body = blobs[0]
        connection = socket.create_connection((host, int(port)), timeout=WAIT_S)
        connection.sendall(f"POST /v1/classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
                           f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:len(body) // 2])
        # in flight: besides the /metrics request reading it
        wait_for(lambda: value(metrics(url), "clip_guard_requests_in_progress") >= 2, "the request to be in flight")
        process.send_signal(signal.SIGTERM)

        def refused() -> bool:
            try:
                socket.create_connection((host, int(port)), timeout=5).close()
            except ConnectionRefusedError:
                return True
            return False

        wait_for(refused, "the server to stop accepting connections")
        connection.sendall(body[len(body) // 2:])
        response = b""
        while not response.endswith(b"}") and (chunk := connection.recv(65536)):
            response += chunk
        connection.close()
        head, _, payload = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), response[:200]
        assert Classification.from_dict(json.loads(payload)) == library[0]
        assert process.wait(timeout=WAIT_S) == 0, "".join(lines)
        assert any(line.startswith("serve: stopped") for line in lines), "".join(lines)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_exit_codes(calibrated, tmp_path):
    process, lines = start_cli(tmp_path / "missing", "--port", "0")
    assert process.wait(timeout=WAIT_S) == 3
    wait_for(lambda: lines, "the error line")
    assert lines[-1].startswith("error: ") and "no such artifact" in lines[-1]

    busy = listen("127.0.0.1", 0)
    busy.listen()
    try:
        process, lines = start_cli(calibrated, "--port", busy.getsockname()[1])
        assert process.wait(timeout=WAIT_S) == 2
        wait_for(lambda: lines, "the error line")
        assert "cannot listen on 127.0.0.1" in lines[-1] and "pick another --port" in lines[-1]
    finally:
        busy.close()

    damaged = Path(shutil.copytree(calibrated, tmp_path / "damaged"))
    (damaged / "visual.safetensors").write_bytes(b"\0" * 16)
    process, lines = start_cli(damaged, "--port", "0", "--device", "cpu")
    assert process.wait(timeout=WAIT_S) == 3  # it listened, the model failed to load, it stopped
    wait_for(lambda: any(line.startswith("error: ") for line in lines), "the error line")
    assert any("listening on" in line for line in lines) and "visual.safetensors" in lines[-1]


def test_the_listening_socket_is_tcp_so_asyncio_turns_nagle_off():
    # asyncio sets TCP_NODELAY only on sockets whose proto says TCP; with Nagle on, a response's
    # header and body writes waited for the client's delayed ACK (40 ms per request, measured)
    sock = listen("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


def test_the_serving_benchmark_runs_end_to_end():
    """Two `python -m guard serve` children and the library, on the tiny model; timings are not asserted."""
    from benchmarks import serve as bench

    results = bench.run([("tiny", "torch")], [1, 2], requests=3, seconds=30)
    assert [(r.mode, r.clients) for r in results] == [(mode, clients) for clients in (1, 2) for mode in bench.MODES]
    assert all(r.requests > 0 and r.errors == 0 for r in results)
    assert all((r.mean_batch is None) == (r.mode == "library") for r in results)
    [row_1, row_2] = bench.comparisons(results)
    assert (row_1["clients"], row_2["clients"]) == (1, 2) and row_2["batching_over_no_batching"] > 0
    text = bench.markdown(results, [row_1, row_2], bench.environment(), "python -m benchmarks.serve", "")
    assert "| tiny | torch | 2 |" in text
