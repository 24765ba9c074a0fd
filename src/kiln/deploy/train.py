"""``kiln deploy CONFIG --k8s-train DIR``: Kubernetes manifests that train a config on several machines.

Two ways, both running the same command in every pod::

    kiln train /etc/kiln/config.yaml --out /runs/<name> --nproc M --nnodes N --node-rank R --rdzv-endpoint HOST:PORT

- ``pytorchjob.yaml``: a Kubeflow ``PyTorchJob`` (kubeflow.org/v1, needs the training operator). One Master and
  N-1 Workers; the operator gives each pod ``MASTER_ADDR``/``MASTER_PORT`` (the Master's service) and
  ``PET_NODE_RANK`` (0 for the Master, 1.. for the Workers), which the command reads.
- ``job.yaml`` + ``service.yaml``: for clusters without the operator, an indexed ``Job`` (completionMode: Indexed,
  N pods) and a headless ``Service`` whose DNS gives pod 0 a stable name, ``<job>-0.<service>``: the rendezvous
  endpoint. Each pod's ``JOB_COMPLETION_INDEX`` (set by Kubernetes) is its node rank.

``configmap.yaml`` holds the config, mounted at /etc/kiln/config.yaml. The run directory is written under /runs:
a PersistentVolumeClaim given with ``--runs-pvc`` (ReadWriteMany, so every pod mounts it), else an emptyDir that
goes with the pod. The pods read ``data.path`` as the config gives it: use a URL (``s3://...``, a streamed table)
or a path on a volume the image or cluster provides.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from kiln.config import load_config
from kiln.deploy import UID, _refuse_existing, k8s_name
from kiln.errors import KilnError
from kiln.fsutil import atomic_write_text
from kiln.rundir import RunDir

CONFIG_DIR = "/etc/kiln"
RUNS_DIR = "/runs"
RDZV_PORT = 29500  # the rendezvous port of the indexed Job (torchrun's default)
OPERATOR_PORT = 23456  # the training operator's default port, named pytorchjob-port
MAX_RESTARTS = 3  # torchrun restarts failed workers in a pod this often; they resume from the last checkpoint


def train_command(name: str, nproc: int, nodes: int, node_rank: str, endpoint: str) -> list[str]:
    """The container command: ``kiln train`` through torchrun (``--nproc``), one node of ``nodes``."""
    return ["kiln", "train", f"{CONFIG_DIR}/config.yaml", "--out", f"{RUNS_DIR}/{name}", "--nproc", str(nproc),
            "--nnodes", str(nodes), "--node-rank", node_rank, "--rdzv-endpoint", endpoint,
            "--max-restarts", str(MAX_RESTARTS)]


def _container(name: str, image: str, command: list[str], port: dict, nproc: int, gpus: int, cpu: str,
               memory: str) -> dict[str, Any]:
    resources: dict[str, Any] = {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory}}
    if gpus:
        resources["limits"]["nvidia.com/gpu"] = gpus
    return {
        "name": name, "image": image, "command": command, "ports": [port],
        "env": [{"name": "OMP_NUM_THREADS", "value": "1"}],  # kiln sets train.threads; torchrun would warn
        "resources": resources,
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                         {"name": "runs", "mountPath": RUNS_DIR},
                         {"name": "shm", "mountPath": "/dev/shm"}],  # collectives use shared memory
    }


def _pod_spec(container: dict, app: str, runs_pvc: str | None, **extra: Any) -> dict[str, Any]:
    runs = {"persistentVolumeClaim": {"claimName": runs_pvc}} if runs_pvc else {"emptyDir": {}}
    return {**extra, "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [container],
            "volumes": [{"name": "config", "configMap": {"name": f"{app}-config"}}, {"name": "runs", **runs},
                        {"name": "shm", "emptyDir": {"medium": "Memory"}}]}


def train_manifests(name: str, config_yaml: str, image: str, nodes: int, nproc_per_node: int, gpus: int = 0,
                    runs_pvc: str | None = None, cpu: str = "2", memory: str = "8Gi") -> dict[str, dict[str, Any]]:
    """ConfigMap, PyTorchJob, indexed Job and headless Service as plain dicts, by file name."""
    if nodes < 1 or nproc_per_node < 1:
        raise KilnError(f"--nodes {nodes} and --nproc-per-node {nproc_per_node}: give 1 or more of each")
    if gpus and gpus < nproc_per_node:
        raise KilnError(f"--gpus-per-node {gpus} is fewer than --nproc-per-node {nproc_per_node}: one GPU per process")
    app = k8s_name(f"{name}-train")[:52].strip("-")  # room for the pods' suffixes
    labels = {"app.kubernetes.io/name": app, "app.kubernetes.io/part-of": "kiln"}
    meta = {"name": app, "labels": labels}
    configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{app}-config", "labels": labels},
                 "data": {"config.yaml": config_yaml}}

    operator = _container("pytorch", image, train_command(name, nproc_per_node, nodes, "$(PET_NODE_RANK)",
                                                          "$(MASTER_ADDR):$(MASTER_PORT)"),
                          {"name": "pytorchjob-port", "containerPort": OPERATOR_PORT, "protocol": "TCP"},
                          nproc_per_node, gpus, cpu, memory)

    def replica(count: int) -> dict[str, Any]:
        return {"replicas": count, "restartPolicy": "Never",
                "template": {"metadata": {"labels": labels}, "spec": _pod_spec(operator, app, runs_pvc)}}

    replicas = {"Master": replica(1), **({"Worker": replica(nodes - 1)} if nodes > 1 else {})}
    pytorchjob = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": meta,
                  "spec": {"nprocPerNode": str(nproc_per_node), "pytorchReplicaSpecs": replicas,
                           "runPolicy": {"backoffLimit": 0, "cleanPodPolicy": "None"}}}

    endpoint = f"{app}-0.{app}:{RDZV_PORT}"  # pod 0 of the indexed Job, through the headless Service
    indexed = _container("trainer", image, train_command(name, nproc_per_node, nodes, "$(JOB_COMPLETION_INDEX)",
                                                         endpoint),
                         {"name": "rdzv", "containerPort": RDZV_PORT, "protocol": "TCP"}, nproc_per_node, gpus, cpu,
                         memory)
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
           "spec": {"completionMode": "Indexed", "completions": nodes, "parallelism": nodes, "backoffLimit": 0,
                    "template": {"metadata": {"labels": labels},
                                 "spec": _pod_spec(indexed, app, runs_pvc, subdomain=app, restartPolicy="Never")}}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": meta,
               "spec": {"clusterIP": "None", "selector": labels, "publishNotReadyAddresses": True,
                        "ports": [{"name": "rdzv", "port": RDZV_PORT, "targetPort": "rdzv", "protocol": "TCP"}]}}
    return {"configmap.yaml": configmap, "pytorchjob.yaml": pytorchjob, "job.yaml": job, "service.yaml": service}


def deploy_k8s_train(run_or_config: str | Path, out: str | Path, nodes: int = 1, nproc_per_node: int = 1,
                     image: str | None = None, gpus: int = 0, runs_pvc: str | None = None) -> list[Path]:
    """Write the training manifests for a config file (or a run directory's config); returns the files written."""
    source = Path(run_or_config)
    config = source / RunDir.CONFIG if source.is_dir() else source
    if not config.is_file():
        raise KilnError(f"{run_or_config}: neither a config file nor a run directory with {RunDir.CONFIG}")
    cfg = load_config(config)  # refuses a config that would not train, before anything is written
    out = Path(out)
    manifests = train_manifests(cfg.name, cfg.to_yaml(), image or "kiln:latest", nodes, nproc_per_node, gpus,
                                runs_pvc)
    paths = [out / f for f in manifests]
    _refuse_existing(paths)
    for path, doc in zip(paths, manifests.values(), strict=True):
        plain = json.loads(json.dumps(doc))  # shared dicts written out, not as YAML aliases
        atomic_write_text(path, yaml.safe_dump(plain, sort_keys=False))
    return paths
