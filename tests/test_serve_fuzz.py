"""Property-based fuzzing of the running service against its own OpenAPI document (schemathesis):
no 5xx, every response (status code, content type, body) conforms to the document, and a bounded soak
in which the server's memory stays steady."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'kiln[serve]'")
schemathesis = pytest.importorskip("schemathesis")

import httpx  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from test_serve_support import Server, mnist_test_images, serve_run, table_run  # noqa: E402,F401


@pytest.fixture(scope="module")
def live_server(serve_run):
    server = Server(serve_run, "--max-instances", "8").wait_ready()
    yield server
    server.stop()


def test_api_conforms_to_its_openapi_document(live_server):
    check_conformance(live_server)


def test_table_api_conforms_to_its_openapi_document(table_run):
    """The same for a table run, whose request schema lists its columns."""
    server = Server(table_run, "--max-instances", "8").wait_ready()
    try:
        check_conformance(server)
    finally:
        server.stop()


def check_conformance(server: Server) -> None:
    """Every operation, with valid (positive) and invalid (negative) generated requests."""
    from hypothesis import given
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/predict", "/v1/model", "/healthz", "/readyz", "/metrics"}
    for op in operations:
        # Only predict takes input; an operation without any has no invalid request to generate.
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if op.method.lower() == "post" else [])
        for mode in modes:
            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def check(case):
                # Schema-valid is not always acceptable here: no JSON schema can say that a base64 string
                # holds a decodable PNG (or that "NA" means a missing value in a table), so that one check is
                # left out; a 422 still has to match the document.
                case.call_and_validate(excluded_checks=[positive_data_acceptance])

            check()


@pytest.mark.slow
def test_memory_stays_steady_over_a_soak(live_server, mnist_root):
    """A few thousand requests of every kind (good, bad, batched) on one keep-alive client: RSS must not
    keep growing once warm."""
    images, _ = mnist_test_images(8)
    good = {"instances": [{"pixels": im.tolist()} for im in images[:2]]}
    bad = {"instances": [{"pixels": [[0] * 27] * 28}]}
    with httpx.Client(base_url=live_server.url, timeout=30) as client:
        def burst(n):
            for i in range(n):
                if i % 4 == 3:
                    assert client.post("/v1/predict", json=bad).status_code == 422
                elif i % 8 == 2:
                    assert client.post("/v1/predict", content=b"{", headers={"content-type": "application/json"}).status_code == 400
                else:
                    assert client.post("/v1/predict", json=good).status_code == 200

        burst(500)  # warm: allocator pools, caches
        warm = live_server.rss_bytes()
        burst(2500)
        after = live_server.rss_bytes()
        assert "kiln_request_errors_total{code=\"internal\"}" not in client.get("/metrics").text
    growth = (after - warm) / 2**20
    assert growth < 20, f"RSS grew by {growth:.1f} MiB over 2,500 requests ({warm / 2**20:.0f} -> {after / 2**20:.0f} MiB)"
