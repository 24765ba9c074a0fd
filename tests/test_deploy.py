"""kiln deploy: a Dockerfile and Kubernetes manifests that validate against the Kubernetes schemas, and
a container command that starts the server from the generated layout."""

from __future__ import annotations

import json
import sys

import httpx
import pytest
import yaml

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'kiln[serve]'")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

from test_serve_support import Server, free_port, serve_run, table_run  # noqa: E402,F401
from test_serve_tabular_text import instances_of, lm_run, pairs_run  # noqa: E402,F401
from test_tabular import synthetic_rows  # noqa: E402

import kiln  # noqa: E402
from kiln.cli import main  # noqa: E402
from kiln.deploy import UID, k8s_manifests, k8s_name  # noqa: E402

K8S_VERSION = "1.30.0"  # schemas shipped inside kubernetes-validate: no network needed


def dockerfile_lines(path):
    return [line for line in path.read_text().splitlines() if line and not line.startswith("#")]


def test_docker_context(serve_run, tmp_path, capsys):
    out = tmp_path / "image"
    assert main(["deploy", str(serve_run), "--docker", str(out)]) == 0
    lines = dockerfile_lines(out / "Dockerfile")
    assert lines[0] == "FROM python:3.11-slim"
    assert f"USER {UID}" in lines and any(line.startswith("HEALTHCHECK") for line in lines)
    assert any("/healthz" in line for line in lines)
    copied = {p.name for p in (out / "run").iterdir()}  # model.onnx too when the run was exported
    assert {"config.yaml", "manifest.json", "model.safetensors", "results.json"} <= copied <= {
        "config.yaml", "manifest.json", "model.safetensors", "results.json", "model.onnx"}
    assert "kiln[serve]" in (out / "Dockerfile").read_text()
    # Never overwrites: a second deploy into the same place is refused.
    assert main(["deploy", str(serve_run), "--docker", str(out)]) == 2
    assert "already exist" in capsys.readouterr().err


def test_k8s_manifests_validate_against_the_kubernetes_schemas(serve_run, tmp_path):
    out = tmp_path / "k8s"
    assert main(["deploy", str(serve_run), "--k8s", str(out), "--image", "registry.example/kiln:1"]) == 0
    docs = {p.name: yaml.safe_load(p.read_text()) for p in out.glob("*.yaml")}
    assert set(docs) == {"deployment.yaml", "service.yaml", "hpa.yaml"}
    for doc in docs.values():
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises on any schema violation
    pod = docs["deployment.yaml"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == "registry.example/kiln:1"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert c["securityContext"]["runAsNonRoot"] and c["securityContext"]["runAsUser"] == UID
    assert docs["hpa.yaml"]["spec"]["scaleTargetRef"]["name"] == docs["deployment.yaml"]["metadata"]["name"]
    assert docs["service.yaml"]["spec"]["selector"] == docs["deployment.yaml"]["spec"]["selector"]["matchLabels"]


def test_the_validator_catches_a_broken_manifest():
    deployment = k8s_manifests("x", "img")["deployment.yaml"]
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    assert k8s_name("MNIST_seed.v2") == "mnist-seed-v2"


def test_container_command_starts_the_server_from_the_generated_layout(serve_run, tmp_path):
    out = tmp_path / "image"
    assert main(["deploy", str(serve_run), "--docker", str(out)]) == 0
    text = (out / "Dockerfile").read_text()
    workdir = next(line.split()[1] for line in text.splitlines() if line.startswith("WORKDIR"))
    assert workdir == "/app"
    entrypoint = json.loads(next(line for line in text.splitlines() if line.startswith("ENTRYPOINT"))[11:])
    assert entrypoint[:3] == ["kiln", "serve", "run"]
    # Run the image's command with the build context standing in for /app, on a free loopback port.
    port = free_port()
    args = entrypoint[1:]
    args[args.index("--port") + 1] = str(port)
    args[args.index("--host") + 1] = "127.0.0.1"
    server = Server(serve_run, command=[sys.executable, "-m", "kiln", *args], cwd=out)
    server.port, server.url = port, f"http://127.0.0.1:{port}"
    try:
        server.wait_ready()
        assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
        resp = httpx.post(server.url + "/v1/predict", json={"instances": [{"pixels": [[0] * 28] * 28}]})
        assert resp.status_code == 200 and resp.json()["model"]["name"] == "mnist_seed"
    finally:
        server.stop()


@pytest.mark.parametrize("which", ["image", "table", "pairs", "lm"])
def test_every_kind_of_run_serves_from_its_deploy_folder_alone(which, request, tmp_path):
    """The Docker context holds what serving reads, the kind of data's own files included (a table's
    preprocessing, a text's tokenizer): the run served from there alone answers as the original does."""
    from fastapi.testclient import TestClient
    from test_serve_support import mnist_test_images

    from kiln.serve import create_app

    run = request.getfixturevalue({"image": "serve_run", "table": "table_run", "pairs": "pairs_run",
                                   "lm": "lm_run"}[which])
    if which == "image":
        instances = [{"pixels": image.tolist()} for image in mnist_test_images(3)[0]]
    elif which == "table":
        instances = instances_of(synthetic_rows(5, seed=3))
    elif which == "pairs":
        instances = [{"text": "forty-two"}, {"text": "seven hundred twelve"}]
    else:
        instances = [{"prompt": "First", "max_new_tokens": 12, "temperature": 0.8, "top_k": 5, "seed": 3}]
    out = tmp_path / "image"
    assert main(["deploy", str(run), "--docker", str(out)]) == 0
    kind = kiln.Run.load(run).kind
    copied = {p.name for p in (out / "run").iterdir()} - {"model.onnx"}
    assert copied == {"config.yaml", "manifest.json", "results.json", "model.safetensors", *kind.run_files}
    answers = []
    for folder in (run, out / "run"):
        with TestClient(create_app(folder)) as client:
            resp = client.post("/v1/predict", json={"instances": instances})
            assert resp.status_code == 200, resp.text[:300]
            answers.append(resp.json()["predictions"])
    assert answers[0] == answers[1]


def test_api_key_comes_from_a_kubernetes_secret_and_guards_all_but_the_probes(serve_run, tmp_path, capsys):
    image, k8s = tmp_path / "image", tmp_path / "k8s"
    assert main(["deploy", str(serve_run), "--docker", str(image), "--k8s", str(k8s),
                 "--api-key-env", "KILN_API_KEY"]) == 0
    assert "kubectl create secret generic mnist-seed-api-key --from-literal=api-key=" in capsys.readouterr().out
    deployment = yaml.safe_load((k8s / "deployment.yaml").read_text())
    kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    c = deployment["spec"]["template"]["spec"]["containers"][0]
    assert c["env"] == [{"name": "KILN_API_KEY",
                         "valueFrom": {"secretKeyRef": {"name": "mnist-seed-api-key", "key": "api-key"}}}]
    assert c["args"] == ["--api-key-env", "KILN_API_KEY"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz" and c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # What the pod runs: the image's command with the Deployment's arguments, the Secret's key in the variable.
    text = (image / "Dockerfile").read_text()
    entrypoint = json.loads(next(line for line in text.splitlines() if line.startswith("ENTRYPOINT"))[11:])
    assert entrypoint[-2:] == ["--api-key-env", "KILN_API_KEY"]
    port = free_port()
    args = entrypoint[1:] + c["args"]
    args[args.index("--port") + 1] = str(port)
    args[args.index("--host") + 1] = "127.0.0.1"
    server = Server(serve_run, command=[sys.executable, "-m", "kiln", *args], cwd=image, env={"KILN_API_KEY": "k3y"})
    server.port, server.url = port, f"http://127.0.0.1:{port}"
    key = {"authorization": "Bearer k3y"}
    try:
        server.wait_ready()
        for path in ("/healthz", "/readyz"):
            assert httpx.get(server.url + path).status_code == 200, path
        for path in ("/metrics", "/openapi.json", "/docs", "/v1/model"):
            assert httpx.get(server.url + path).status_code == 401, path
            assert httpx.get(server.url + path, headers=key).status_code == 200, path
        body = {"instances": [{"pixels": [[0] * 28] * 28}]}
        assert httpx.post(server.url + "/v1/predict", json=body).status_code == 401
        assert httpx.post(server.url + "/v1/predict", json=body, headers=key).status_code == 200
    finally:
        server.stop()


def test_deploy_refuses_an_api_key_variable_that_is_no_variable_name(serve_run, tmp_path, capsys):
    assert main(["deploy", str(serve_run), "--k8s", str(tmp_path / "k8s"), "--api-key-env", "MY-KEY"]) == 2
    assert "not an environment variable name" in capsys.readouterr().err
    assert not (tmp_path / "k8s").exists()


def test_no_file_is_read_or_copied_through_a_symbolic_link_in_a_run(table_run, tmp_path, capsys):
    """A results.json linking to a secret file was once copied into the Docker build context."""
    import shutil

    run = shutil.copytree(table_run, tmp_path / "run")
    secret = tmp_path / "secret.txt"
    secret.write_text("password=hunter2\n")
    (run / "results.json").unlink()
    (run / "results.json").symlink_to(secret)
    assert main(["deploy", str(run), "--docker", str(tmp_path / "image")]) == 2
    assert "results.json is a symbolic link" in capsys.readouterr().err
    copied = [p for p in (tmp_path / "image").rglob("*") if p.is_file()] if (tmp_path / "image").exists() else []
    assert not any("hunter2" in p.read_text(errors="replace") for p in copied)
    assert main(["evaluate", str(run)]) == 2  # the results are read through the same check
    assert "symbolic link" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["weights-metadata", "preprocessing-missing-field", "preprocessing-wrong-type"])
def test_damaged_run_files_are_errors_not_tracebacks(table_run, tmp_path, capsys, damage):
    import shutil

    from safetensors.torch import load_file, save_file

    run = shutil.copytree(table_run, tmp_path / "run")
    if damage == "weights-metadata":
        weights = run / "model.safetensors"
        save_file(load_file(str(weights)), str(weights), metadata={"kiln": "{not json", "info": "{not json"})
        fragment = "is not a kiln weights file"
    else:  # a left-out mean once shifted every value silently; a text for a number was a traceback
        prep = json.loads((run / "preprocessing.json").read_text())
        if damage == "preprocessing-missing-field":
            del prep["columns"][0]["mean"]
        else:
            prep["columns"][0]["mean"] = "x"
        (run / "preprocessing.json").write_text(json.dumps(prep))
        fragment = "is not a kiln table preprocessing file: columns.0"
    assert main(["evaluate", str(run)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err, err
