"""kiln serve: the HTTP API on a real trained run, every bad-request class, batching, auth, shutdown."""

from __future__ import annotations

import asyncio
import base64
import importlib
import io
import logging
import shutil
import signal
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image
from pydantic import TypeAdapter

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'kiln[serve]'")

from fastapi.testclient import TestClient  # noqa: E402
from test_serve_support import Server, exported_run, mnist_test_images, serve_run  # noqa: E402,F401

import kiln  # noqa: E402
from kiln.cli import main  # noqa: E402
from kiln.serve import create_app  # noqa: E402
from kiln.serve.batcher import MicroBatcher  # noqa: E402


def png_bytes(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(serve_run):
    with TestClient(create_app(serve_run, max_instances=64, max_body_bytes=2 * 2**20)) as c:
        yield c


def test_health_ready_model_and_metrics(client, serve_run):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    info = client.get("/v1/model").json()
    assert info["name"] == "mnist_seed" and info["dataset"] == "mnist" and info["backend"] == "torch"
    assert info["task"] == "multiclass" and info["outputs"]["kind"] == "class probabilities"
    assert info["inputs"]["shape"] == [1, 28, 28] and info["outputs"]["classes"] == [str(d) for d in range(10)]
    assert info["metrics"]["test"] == kiln.Run.load(serve_run).metrics["test"]
    assert info["parameters"] == 71_268 and len(info["version"]) == 12
    client.post("/v1/predict", json={"instances": [{"pixels": [[0] * 28] * 28}]})
    text = client.get("/metrics").text
    assert 'kiln_requests_total{code="200",route="/v1/predict"}' in text
    assert "kiln_request_duration_seconds_bucket" in text and "kiln_batch_size_count" in text


def test_openapi_schema_comes_from_the_run(client):
    spec = client.get("/openapi.json").json()
    pixels = spec["components"]["schemas"]["PixelInstance"]["properties"]["pixels"]
    assert pixels["minItems"] == pixels["maxItems"] == 28
    assert pixels["items"]["minItems"] == 28 and pixels["items"]["items"]["maximum"] == 255
    body = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}


def test_predictions_match_run_predict_in_every_input_form(client, serve_run, mnist_root):
    images, labels = mnist_test_images(32)
    expected = kiln.Run.load(serve_run).predict(images).numpy()

    def probs(resp):
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["model"]["name"] == "mnist_seed"
        return np.array([[p["probabilities"][str(d)] for d in range(10)] for p in body["predictions"]])

    as_uint8 = client.post("/v1/predict", json={"instances": [{"pixels": im.tolist()} for im in images]})
    np.testing.assert_allclose(probs(as_uint8), expected, atol=2e-6)
    as_unit = client.post("/v1/predict", json={"instances": [{"pixels": (im / 255).tolist(), "scale": "unit"}
                                                             for im in images[:4]]})
    np.testing.assert_allclose(probs(as_unit), expected[:4], atol=2e-6)
    as_b64 = client.post("/v1/predict", json={"instances": [{"image_base64": base64.b64encode(png_bytes(im)).decode()}
                                                            for im in images[:4]]})
    np.testing.assert_allclose(probs(as_b64), expected[:4], atol=2e-6)
    files = [("files", (f"d{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(images[:4])]
    np.testing.assert_allclose(probs(client.post("/v1/predict", files=files)), expected[:4], atol=2e-6)
    # A scanned-looking JPEG (dark digit on light paper, larger, colour) is converted like `kiln predict` does.
    scan = np.stack([255 - np.asarray(Image.fromarray(images[0]).resize((84, 84)))] * 3, axis=-1)
    jpeg = client.post("/v1/predict", files=[("files", ("scan.jpg", png_bytes(scan, "JPEG"), "image/jpeg"))])
    assert jpeg.json()["predictions"][0]["index"] == int(expected[0].argmax())
    top = [p["index"] for p in as_uint8.json()["predictions"]]
    assert top == expected.argmax(1).tolist()


GOOD = [[0] * 28] * 28


def bad_requests(client):
    """(name, response, expected status, expected error code) for each class of client mistake."""
    big = client.app.state.kiln["settings"].max_body_bytes
    post = client.post
    yield "invalid JSON", post("/v1/predict", content=b'{"instances": [', headers={"content-type": "application/json"}), 400, "invalid_json"
    yield "not an object", post("/v1/predict", json=[1, 2]), 422, "invalid_request"
    yield "missing instances", post("/v1/predict", json={}), 422, "invalid_request"
    yield "empty instances", post("/v1/predict", json={"instances": []}), 422, "invalid_request"
    yield "unknown key", post("/v1/predict", json={"instances": [{"pixels": GOOD}], "x": 1}), 422, "invalid_request"
    yield "instance not an object", post("/v1/predict", json={"instances": [7]}), 422, "invalid_request"
    yield "wrong shape", post("/v1/predict", json={"instances": [{"pixels": [[0] * 27] * 28}]}), 422, "invalid_request"
    yield "flat pixels", post("/v1/predict", json={"instances": [{"pixels": [0] * 784}]}), 422, "invalid_request"
    yield "wrong type", post("/v1/predict", json={"instances": [{"pixels": [["a"] * 28] * 28}]}), 422, "invalid_request"
    yield "number as text", post("/v1/predict", json={"instances": [{"pixels": [["12"] * 28] * 28}]}), 422, "invalid_request"
    yield "boolean pixel", post("/v1/predict", json={"instances": [{"pixels": [[True] * 28] * 28}]}), 422, "invalid_request"
    yield "pixel over 255", post("/v1/predict", json={"instances": [{"pixels": [[256] * 28] * 28}]}), 422, "invalid_request"
    yield "negative pixel", post("/v1/predict", json={"instances": [{"pixels": [[-1] * 28] * 28}]}), 422, "invalid_request"
    yield "unit scale over 1", post("/v1/predict", json={"instances": [{"pixels": [[2] * 28] * 28, "scale": "unit"}]}), 422, "invalid_input"
    yield "unknown scale", post("/v1/predict", json={"instances": [{"pixels": GOOD, "scale": "big"}]}), 422, "invalid_request"
    yield "not base64 characters", post("/v1/predict", json={"instances": [{"image_base64": "!!!!"}]}), 422, "invalid_request"
    yield "bad base64 padding", post("/v1/predict", json={"instances": [{"image_base64": "abcde"}]}), 422, "invalid_input"
    yield "base64 not an image", post("/v1/predict", json={"instances": [{"image_base64": base64.b64encode(b"hello").decode()}]}), 422, "invalid_input"
    gif = io.BytesIO()
    Image.new("L", (28, 28)).save(gif, format="GIF")
    yield "GIF is not PNG/JPEG", post("/v1/predict", json={"instances": [{"image_base64": base64.b64encode(gif.getvalue()).decode()}]}), 422, "invalid_input"
    huge = png_bytes(np.zeros((5000, 10), dtype=np.uint8))
    yield "image too large", post("/v1/predict", files=[("files", ("h.png", huge, "image/png"))]), 422, "invalid_input"
    truncated = png_bytes(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))[:200]
    yield "truncated PNG upload", post("/v1/predict", files=[("files", ("t.png", truncated, "image/png"))]), 422, "invalid_input"
    yield "too many instances", post("/v1/predict", json={"instances": [{"pixels": GOOD}] * 65}), 422, "too_many_instances"
    yield "too many files", post("/v1/predict", files=[("files", (f"{i}.png", b"x", "image/png")) for i in range(65)]), 422, "too_many_instances"
    yield "body too large", post("/v1/predict", content=b" " * (big + 1), headers={"content-type": "application/json"}), 413, "body_too_large"

    def chunks():
        for _ in range(big // 65536 + 2):
            yield b" " * 65536
    yield "chunked body too large", post("/v1/predict", content=chunks(), headers={"content-type": "application/json"}), 413, "body_too_large"
    yield "no content type", post("/v1/predict", content=b"{}"), 415, "unsupported_media_type"
    yield "text content type", post("/v1/predict", content=b"1", headers={"content-type": "text/plain"}), 415, "unsupported_media_type"
    form = {"content-type": "multipart/form-data; boundary=b"}
    field = b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n--b--\r\n'
    yield "multipart without files", post("/v1/predict", content=field, headers=form), 422, "invalid_request"
    yield "empty multipart", post("/v1/predict", content=b"--b--\r\n", headers=form), 422, "invalid_request"
    yield "multipart text field as files", post("/v1/predict", data={"files": "abc"}, files=[("other", ("a", b"", "x/y"))]), 422, "invalid_request"
    yield "broken multipart", post("/v1/predict", content=b"--b\r\nxx", headers={"content-type": "multipart/form-data"}), 400, "invalid_multipart"
    yield "unknown route", client.get("/v2/nothing"), 404, "not_found"
    yield "wrong method", client.get("/v1/predict"), 405, "method_not_allowed"


def test_every_bad_request_is_a_4xx_json_error_and_the_server_keeps_serving(client):
    seen = []
    for name, resp, status, code in bad_requests(client):
        assert resp.status_code == status, (name, resp.status_code, resp.text[:300])
        err = resp.json()["error"]
        assert err["code"] == code and err["message"], (name, err)
        seen.append(name)
        ok = client.post("/v1/predict", json={"instances": [{"pixels": GOOD}]})
        assert ok.status_code == 200, f"after {name}: {ok.text[:200]}"
    assert len(seen) == 33
    assert "kiln_request_errors_total{code=\"internal\"}" not in client.get("/metrics").text


def test_error_messages_say_what_is_wrong(client):
    err = client.post("/v1/predict", json={"instances": [{"pixels": [[0] * 27] * 28}]}).json()["error"]
    assert err["details"][0]["loc"] == "instances.0.pixels.0" and "28" in err["details"][0]["msg"]
    err = client.post("/v1/predict", json={"instances": [{"image_base64": "aGk="}]}).json()["error"]
    assert "instances.0.image_base64" in err["message"] and "PNG or JPEG" in err["message"]


def test_api_key(serve_run, monkeypatch):
    monkeypatch.setenv("KILN_TEST_KEY", "s3cret")
    with TestClient(create_app(serve_run, api_key_env="KILN_TEST_KEY")) as c:
        body = {"instances": [{"pixels": GOOD}]}
        assert c.post("/v1/predict", json=body).status_code == 401
        wrong = c.post("/v1/predict", json=body, headers={"x-api-key": "nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "unauthorized"
        assert c.post("/v1/predict", json=body, headers={"x-api-key": "s3cret"}).status_code == 200
        assert c.get("/v1/model", headers={"authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/v1/model").status_code == 401
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200  # probes stay open
        spec = c.get("/openapi.json", headers={"x-api-key": "s3cret"}).json()
        assert "apiKey" in spec["components"]["securitySchemes"]
    monkeypatch.delenv("KILN_TEST_KEY")
    with pytest.raises(kiln.KilnError, match="KILN_TEST_KEY"):
        create_app(serve_run, api_key_env="KILN_TEST_KEY")


def test_onnx_backend_matches_torch(tmp_path_factory, mnist_root):
    run = exported_run(tmp_path_factory)
    images, _ = mnist_test_images(16)
    body = {"instances": [{"pixels": im.tolist()} for im in images]}
    with TestClient(create_app(run, backend="onnx")) as c:
        resp = c.post("/v1/predict", json=body).json()
        assert resp["model"]["backend"] == "onnx"
    got = np.array([[p["probabilities"][str(d)] for d in range(10)] for p in resp["predictions"]])
    np.testing.assert_allclose(got, kiln.Run.load(run).predict(images).numpy(), atol=1e-5)


def test_with_a_key_metrics_and_the_api_document_need_it_too(serve_run, monkeypatch):
    monkeypatch.setenv("KILN_TEST_KEY", "s3cret")
    with TestClient(create_app(serve_run, api_key_env="KILN_TEST_KEY")) as c:
        for path in ("/metrics", "/openapi.json", "/docs"):
            refused = c.get(path)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized", path
            assert c.get(path, headers={"authorization": "Bearer s3cret"}).status_code == 200, path
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        spec = c.get("/openapi.json", headers={"x-api-key": "s3cret"}).json()
        assert spec["paths"]["/metrics"]["get"]["security"] == [{"apiKey": []}]
        assert "security" not in spec["paths"]["/healthz"]["get"]
    with TestClient(create_app(serve_run)) as c:  # without a key all of it is open
        assert all(c.get(path).status_code == 200 for path in ("/metrics", "/openapi.json", "/docs"))


@pytest.mark.parametrize("key", ["schlüssel", "tab\tkey", " padded", "trailing "])
def test_api_keys_that_headers_cannot_carry_are_refused_at_start(serve_run, monkeypatch, key):
    """HTTP header values are latin-1 bytes without surrounding blanks: such a key could never be matched."""
    monkeypatch.setenv("KILN_TEST_KEY", key)
    with pytest.raises(kiln.KilnError, match="KILN_TEST_KEY.*printable ASCII"):
        create_app(serve_run, api_key_env="KILN_TEST_KEY")


def test_a_model_giving_nan_is_a_server_fault_with_a_log_line(serve_run, tmp_path, caplog):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(serve_run, tmp_path / "broken")
    weights = load_file(broken / "model.safetensors")
    with safe_open(str(broken / "model.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    weights["blocks.7.bias"][:] = float("nan")  # the output layer
    save_file(weights, broken / "model.safetensors", metadata=metadata)
    with TestClient(create_app(broken)) as c, caplog.at_level(logging.ERROR, logger="uvicorn.error"):
        resp = c.post("/v1/predict", json={"instances": [{"pixels": GOOD}, {"pixels": GOOD}]})
        metrics = c.get("/metrics").text
    assert resp.status_code == 500 and resp.json()["error"]["code"] == "non_finite_output", resp.text
    assert "instances.0" in resp.json()["error"]["message"]
    assert 'kiln_request_errors_total{code="non_finite_output"} 1.0' in metrics
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("mnist_seed" in line and "not a finite number" in line and "500" in line for line in lines), lines


def test_a_request_over_the_pixel_budget_is_refused(client):
    """20 large PNGs in one 1.2 MB request once took 7.7 s to decode; a request's images may have
    2 x 4096 x 4096 pixels in all, counted before each is decoded."""
    big = png_bytes(np.zeros((4096, 4096, 3), dtype=np.uint8))  # 49 kB: flat images compress well
    start = time.perf_counter()
    resp = client.post("/v1/predict", files=[("files", (f"big{i}.png", big, "image/png")) for i in range(20)])
    elapsed = time.perf_counter() - start
    err = resp.json()["error"]
    assert resp.status_code == 422 and err["code"] == "invalid_input", resp.text[:300]
    assert err["details"][0]["loc"] == "files.2 (big2.png)" and "pixels in all" in err["message"]
    assert elapsed < 5, f"{elapsed:.1f} s"  # two images decoded, not twenty
    two = client.post("/v1/predict", files=[("files", (f"big{i}.png", big, "image/png")) for i in range(2)])
    assert two.status_code == 200


@pytest.mark.parametrize("form", ["files", "base64"])
def test_image_decoding_does_not_hold_up_the_event_loop(client, monkeypatch, form):
    import kiln.data.images

    fit_image = kiln.data.images.fit_image  # what an image kind's `fit` calls on each decoded upload
    decoding = threading.Event()

    def slow_fit_image(img, shape):  # stands for the decoding of large images: 1 s
        decoding.set()
        time.sleep(1.0)
        return fit_image(img, shape)

    monkeypatch.setattr(kiln.data.images, "fit_image", slow_fit_image)
    image = png_bytes(mnist_test_images(1)[0][0])
    if form == "files":
        request = {"files": [("files", ("d.png", image, "image/png"))]}
    else:
        request = {"json": {"instances": [{"image_base64": base64.b64encode(image).decode()}]}}
    answers = []
    sender = threading.Thread(target=lambda: answers.append(client.post("/v1/predict", **request)))
    sender.start()
    assert decoding.wait(timeout=30)
    start = time.perf_counter()
    assert client.get("/healthz").status_code == 200
    waited = time.perf_counter() - start
    sender.join(timeout=30)
    assert answers[0].status_code == 200, answers[0].text[:300]
    assert waited < 0.5, f"/healthz waited {waited:.2f} s for an image being decoded"


class _SlowBackend:
    def __init__(self):
        self.batches = []

    def start(self, example=None):
        pass

    def predict(self, x):
        self.batches.append(len(x))
        time.sleep(0.01)
        return x.reshape(len(x), -1)[:, :2].astype(np.float32)


def test_micro_batcher_groups_concurrent_requests_and_keeps_order():
    backend = _SlowBackend()
    batcher = MicroBatcher(backend, max_batch=16, max_wait_s=0.005)
    batcher.start()

    async def many():
        reqs = [np.full((1 + i % 3, 1, 2, 2), i, dtype=np.uint8) for i in range(40)]
        outs = await asyncio.gather(*(batcher.predict(r) for r in reqs))
        for i, (r, o) in enumerate(zip(reqs, outs, strict=True)):
            assert o.shape == (len(r), 2) and (o == i).all()

    try:
        asyncio.run(many())
    finally:
        batcher.stop()
    assert sum(backend.batches) == sum(1 + i % 3 for i in range(40))
    assert len(backend.batches) < 20 and max(backend.batches) <= 16 + 2  # grouped; one request is never split


def test_batch_of_one_waits_at_most_max_wait():
    backend = _SlowBackend()
    batcher = MicroBatcher(backend, max_batch=64, max_wait_s=0.002)
    batcher.start()
    try:
        start = time.perf_counter()
        asyncio.run(batcher.predict(np.zeros((1, 1, 2, 2), dtype=np.uint8)))
        assert time.perf_counter() - start < 0.01 + 0.002 + 0.05
    finally:
        batcher.stop()


def test_a_lone_request_does_not_wait_but_an_arriving_one_is_waited_for():
    backend = _SlowBackend()
    batcher = MicroBatcher(backend, max_batch=64, max_wait_s=0.5)
    batcher.start()

    async def lone():
        start = time.perf_counter()
        await batcher.predict(np.zeros((1, 1, 2, 2), dtype=np.uint8))
        return time.perf_counter() - start

    async def two():  # the second request is still being read when the first is queued
        async def second():
            with batcher.arriving():
                await asyncio.sleep(0.05)
                batch = np.ones((1, 1, 2, 2), dtype=np.uint8)
            return await batcher.predict(batch)

        task = asyncio.create_task(second())
        await asyncio.sleep(0.01)  # `second` has announced itself
        return await asyncio.gather(batcher.predict(np.zeros((1, 1, 2, 2), dtype=np.uint8)), task)

    try:
        assert asyncio.run(lone()) < 0.2  # max_wait is 0.5 s: nobody else was coming
        backend.batches.clear()
        first, second = asyncio.run(two())
        assert (first == 0).all() and (second == 1).all()
        assert backend.batches == [2]  # one forward pass for both
    finally:
        batcher.stop()


def test_torch_backend_serves_a_frozen_copy_equal_to_the_run(serve_run):
    from kiln.serve.backends import TorchBackend

    run = kiln.Run.load(serve_run)
    backend = TorchBackend(run, threads=1)
    backend.start(np.zeros((1, 1, 28, 28), dtype=np.uint8))
    assert backend.mode.startswith("torchscript")
    images, _ = mnist_test_images(29)
    np.testing.assert_allclose(backend.predict(images[:, None]), run.predict(images).numpy(), atol=1e-5)


def test_models_that_do_not_trace_faithfully_are_served_eager():
    import torch

    from kiln.nn.inference import freeze_for_inference

    class BatchDependent(torch.nn.Module):  # tracing bakes in the branch of the traced batch size
        def forward(self, x):
            return x.float() * 2 if x.shape[0] > 4 else x.float() * 3

    module = BatchDependent()
    forward, mode = freeze_for_inference(module, torch.zeros((1, 3), dtype=torch.uint8))
    assert forward is module and mode.startswith("eager (the traced model differed")


def test_fast_json_path_gives_the_schema_paths_batch(serve_run):
    run = kiln.Run.load(serve_run)
    adapter = run.kind.inputs()
    images, _ = mnist_test_images(3)
    raw = [{"pixels": images[0].tolist()}, {"pixels": (images[1] / 255.0).tolist(), "scale": "unit"},
           {"pixels": (images[2] * 0.99 + 0.4).tolist(), "scale": "uint8"}]
    model = adapter.instance_model()
    checked = TypeAdapter(list[model]).validate_python(raw)
    np.testing.assert_array_equal(adapter.from_json(raw), adapter.from_instances(checked))
    for bad in ({"pixels": images[0].tolist(), "extra": 1}, {"pixels": [[True] * 28] * 28},
                {"pixels": images[0][:27].tolist()}, {"pixels": (images[0] * 2.0).tolist()},
                {"pixels": images[0].tolist(), "scale": "percent"}, {"image_base64": "AAAA"}):
        assert adapter.from_json([raw[0], bad]) is None  # left to the schema, which names the fault


def test_real_server_batches_under_load_and_shuts_down_gracefully(serve_run):
    import socket

    import httpx

    server = Server(serve_run, "--max-wait-ms", "1000", "--max-batch", "64").wait_ready()
    try:
        # A slow client: its body is still arriving, so the batch worker waits (up to max-wait) for it.
        body = json_body({"instances": [{"pixels": GOOD}]})
        slow = socket.create_connection(("127.0.0.1", server.port))
        slow.sendall(f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body[:100])
        results = []

        def call():
            results.append(httpx.post(server.url + "/v1/predict", json={"instances": [{"pixels": GOOD}]},
                                      timeout=30).status_code)

        threads = [threading.Thread(target=call) for _ in range(8)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while "kiln_queue_rows 8" not in httpx.get(server.url + "/metrics").text:
            assert time.monotonic() < deadline, "the eight requests never queued together"
            time.sleep(0.02)
        server.proc.send_signal(signal.SIGTERM)  # while all eight wait for their shared batch
        time.sleep(0.2)
        slow.sendall(body[100:])  # the slow request, in flight at the signal, finishes too
        slow_reply = slow.makefile("rb").read()
        code, out = server.stop()
        for t in threads:
            t.join(timeout=30)
        assert results == [200] * 8, (results, out)
        assert slow_reply.startswith(b"HTTP/1.1 200"), slow_reply[:200]
        # uvicorn re-raises SIGTERM after its graceful shutdown, so the exit status is the signal's.
        assert code in (0, -signal.SIGTERM) and "Application shutdown complete" in out, out
        assert "kiln: serving" in out and "torchscript" in out  # the log says how the model runs
    finally:
        server.stop()


def json_body(doc) -> bytes:
    import json

    return json.dumps(doc, separators=(",", ":")).encode()


def test_serve_without_the_extra_says_how_to_install(monkeypatch):
    for name in list(sys.modules):
        if name == "kiln.serve" or name.startswith("kiln.serve."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(kiln.KilnError, match=r"pip install 'kiln\[serve\]'"):
        importlib.import_module("kiln.serve")


def test_cli_errors_are_one_line_exit_2(serve_run, tmp_path, capsys):
    assert main(["serve", str(tmp_path)]) == 2
    assert "not a kiln run directory" in capsys.readouterr().err
    assert main(["serve", str(serve_run), "--backend", "onnx", "--port", "1", "--max-batch", "0"]) == 2
    assert "max_batch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "--max-wait-ms" in capsys.readouterr().out


def test_each_app_has_its_own_prometheus_registry(serve_run, client):
    from prometheus_client import REGISTRY
    from prometheus_client.parser import text_string_to_metric_families

    def predict_count(c) -> float:
        families = {f.name: f for f in text_string_to_metric_families(c.get("/metrics").text)}
        return sum(s.value for s in families["kiln_requests"].samples
                   if s.name == "kiln_requests_total" and s.labels == {"code": "200", "route": "/v1/predict"})

    before = predict_count(client)
    with TestClient(create_app(serve_run)) as other:  # a second app in the same process
        for _ in range(3):
            assert other.post("/v1/predict", json={"instances": [{"pixels": GOOD}]}).status_code == 200
        assert predict_count(other) == 3
    assert predict_count(client) == before  # the other app's requests are not counted here
    assert not any(m.name.startswith("kiln_") for m in REGISTRY.collect())  # nor in the global registry
