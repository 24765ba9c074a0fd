"""kiln deploy --k8s-train: a Kubeflow PyTorchJob (checked against the schema of its CRD), and an indexed Job with a
headless Service (checked against the Kubernetes schemas), whose pods run a `kiln train` command kiln parses."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

from kiln.cli import _parser, main
from kiln.deploy.train import train_manifests

ROOT = Path(__file__).parent.parent
K8S_VERSION = "1.30.0"  # schemas shipped inside kubernetes-validate: no network needed

# The part of the PyTorchJob CRD's openAPIV3Schema (kubeflow/training-operator release-1.9,
# manifests/base/crds/kubeflow.org_pytorchjobs.yaml) that the generated job uses, with its types, formats and
# required fields as there. The pod template's own schema is Kubernetes' PodTemplateSpec, checked with
# kubernetes-validate instead. additionalProperties: false is added here (the API server prunes unknown fields
# silently; a misspelt one should fail this test).
INT32 = {"type": "integer", "minimum": -2**31, "maximum": 2**31 - 1}
REPLICA_SPEC = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "replicas": INT32,
        "restartPolicy": {"type": "string", "enum": ["Always", "OnFailure", "Never", "ExitCode"]},
        "template": {"type": "object", "properties": {
            "metadata": {"type": "object"},
            "spec": {"type": "object", "required": ["containers"]}}},
    },
}
PYTORCHJOB_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "kubeflow.org/v1"},
        "kind": {"const": "PyTorchJob"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object", "required": ["pytorchReplicaSpecs"], "additionalProperties": False,
            "properties": {
                "nprocPerNode": {"type": "string"},
                "pytorchReplicaSpecs": {"type": "object", "additionalProperties": REPLICA_SPEC,
                                        "propertyNames": {"enum": ["Master", "Worker"]}, "required": ["Master"]},
                "elasticPolicy": {"type": "object"},
                "runPolicy": {"type": "object", "additionalProperties": False, "properties": {
                    "activeDeadlineSeconds": {"type": "integer"}, "backoffLimit": INT32,
                    "cleanPodPolicy": {"type": "string", "enum": ["All", "Running", "None"]},
                    "managedBy": {"type": "string"}, "schedulingPolicy": {"type": "object"},
                    "suspend": {"type": "boolean"}, "ttlSecondsAfterFinished": INT32}},
            },
        },
    },
}


@pytest.fixture
def manifests():
    return train_manifests("Credit Model", "name: credit\n", "registry.example/kiln:1", nodes=3, nproc_per_node=4)


def _pod(template: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": template["metadata"], "spec": template["spec"]}


def test_the_pytorchjob_validates_against_its_crd_schema(manifests):
    job = manifests["pytorchjob.yaml"]
    jsonschema.validate(job, PYTORCHJOB_SCHEMA)
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 2  # 3 nodes
    assert job["spec"]["nprocPerNode"] == "4"
    for spec in specs.values():
        kubernetes_validate.validate(_pod(spec["template"]), K8S_VERSION, strict=True)
        container = spec["template"]["spec"]["containers"][0]
        # The operator finds its container and port by these names (PyTorchJobDefaultContainerName/PortName).
        assert container["name"] == "pytorch" and container["ports"][0]["name"] == "pytorchjob-port"


def test_the_schema_catches_a_broken_pytorchjob(manifests):
    job = copy.deepcopy(manifests["pytorchjob.yaml"])
    job["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = "1"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(job, PYTORCHJOB_SCHEMA)
    job = copy.deepcopy(manifests["pytorchjob.yaml"])
    job["spec"]["nprocPerNodes"] = "4"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(job, PYTORCHJOB_SCHEMA)


def test_the_indexed_job_service_and_configmap_validate(manifests):
    for name in ("job.yaml", "service.yaml", "configmap.yaml"):
        kubernetes_validate.validate(manifests[name], K8S_VERSION, strict=True)
    job, service = manifests["job.yaml"], manifests["service.yaml"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 3
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    pod = spec["template"]["spec"]
    # Pod 0's DNS name is <job>-0.<subdomain>: the headless Service must be that subdomain and select the pods.
    assert pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    command = pod["containers"][0]["command"]
    endpoint = command[command.index("--rdzv-endpoint") + 1]
    assert endpoint == f"{job['metadata']['name']}-0.{service['metadata']['name']}:29500"
    assert command[command.index("--node-rank") + 1] == "$(JOB_COMPLETION_INDEX)"


def _commands(manifests) -> list[list[str]]:
    job = manifests["pytorchjob.yaml"]["spec"]["pytorchReplicaSpecs"]
    return [s["template"]["spec"]["containers"][0]["command"] for s in job.values()] + \
        [manifests["job.yaml"]["spec"]["template"]["spec"]["containers"][0]["command"]]


def test_the_pods_run_a_kiln_train_command(manifests):
    parser = _parser()
    for command in _commands(manifests):
        assert command[:2] == ["kiln", "train"]
        values = dict(zip(command[3::2], command[4::2], strict=False))
        assert values["--nproc"] == "4" and values["--nnodes"] == "3"
        if "--nproc" not in parser._subparsers._group_actions[0].choices["train"].format_help():
            pytest.skip("kiln train has no --nproc yet (multi-process training, the ddp branch of issue 16)")
        # Environment references the cluster fills in ($(VAR)) stand for numbers and host:port.
        filled = [re.sub(r"\$\((\w+)\):\$\((\w+)\)", "master:23456", a).replace("$(PET_NODE_RANK)", "1")
                  .replace("$(JOB_COMPLETION_INDEX)", "2") for a in command[1:]]
        args = parser.parse_args(filled)
        assert (args.nproc, args.nnodes, args.node_rank) == (4, 3, int(filled[filled.index("--node-rank") + 1]))
        assert args.config == "/etc/kiln/config.yaml" and args.out.startswith("/runs/")


def test_deploy_command_writes_the_manifests_of_a_config(tmp_path, capsys):
    out = tmp_path / "k8s"
    assert main(["deploy", str(ROOT / "examples" / "german_credit.yaml"), "--k8s-train", str(out), "--nodes", "2",
                 "--nproc-per-node", "2", "--image", "me/kiln:1", "--runs-pvc", "runs"]) == 0
    written = {p.name: yaml.safe_load(p.read_text()) for p in out.iterdir()}
    assert set(written) == {"configmap.yaml", "pytorchjob.yaml", "job.yaml", "service.yaml"}
    assert yaml.safe_load(written["configmap.yaml"]["data"]["config.yaml"])["name"] == "german_credit"
    volumes = written["job.yaml"]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "runs", "persistentVolumeClaim": {"claimName": "runs"}} in volumes
    jsonschema.validate(written["pytorchjob.yaml"], PYTORCHJOB_SCHEMA)
    assert "kubectl apply" in capsys.readouterr().out
    # Nothing is overwritten.
    assert main(["deploy", str(ROOT / "examples" / "german_credit.yaml"), "--k8s-train", str(out)]) == 2
    assert "already exist" in capsys.readouterr().err


def test_bad_requests_are_errors(tmp_path, capsys):
    assert main(["deploy", str(tmp_path / "nothing.yaml"), "--k8s-train", str(tmp_path / "o")]) == 2
    assert "neither a config file nor a run directory" in capsys.readouterr().err
    assert main(["deploy", str(ROOT / "examples" / "german_credit.yaml"), "--k8s-train", str(tmp_path / "o"),
                 "--nodes", "0"]) == 2
    assert "--nodes 0" in capsys.readouterr().err
    assert main(["deploy", str(ROOT / "examples" / "german_credit.yaml"), "--k8s-train", str(tmp_path / "o"),
                 "--nproc-per-node", "2", "--gpus-per-node", "1"]) == 2
    assert "one GPU per process" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
