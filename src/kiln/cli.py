"""The ``kiln`` command: a thin layer over the Python API (kiln.train, kiln.Run)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from kiln.errors import KilnError

EXAMPLES = """examples:
  kiln train examples/mnist_seed.yaml
  kiln train examples/mnist_seed.yaml --set train.epochs=3 --set model.blocks.3.units=128
  kiln evaluate runs/mnist_seed --split test
  kiln predict runs/mnist_seed digit.png other.npy
  kiln train examples/german_credit.yaml --folds 5
  kiln predict runs/german_credit rows.csv --out predictions.csv
  kiln predict runs/sms_spam --text "WINNER! Call now to claim your prize"
  kiln predict runs/movielens --user 42 --top 10
  kiln summary examples/mnist_seed.yaml
  kiln lr-find examples/mnist_seed.yaml --steps 200
  kiln generate runs/shakespeare_char --prompt "ROMEO:" --max-new-tokens 300 --temperature 0.8 --seed 1
  kiln serve runs/mnist_seed --port 8000
  kiln export runs/mnist_seed
  kiln explain runs/mnist_seed digit.png --method integrated_gradients
  kiln explain runs/german_credit --global
  kiln export runs/german_credit --format torch-export --check random
  kiln report runs/mnist_seed --out mnist_card.html
  kiln audit runs/german_credit --sensitive foreign --sensitive age:25
  kiln tune examples/german_credit.yaml --space examples/german_credit_space.yaml --trials 30 --folds 5
  kiln compress runs/mnist_seed --prune 0.5 --structured --quantize int8 --out runs/mnist_seed_small
  kiln import hf-gpt2 path/to/gpt2 --out runs/gpt2
  kiln export runs/gpt2 --format hf --out gpt2-finetuned
data: MNIST is read from data.root, else $KILN_DATA, else downloaded (checksums verified) into
$KILN_CACHE or ~/.cache/kiln."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln", description="Train, evaluate and use models described in YAML.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"kiln {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model from a config file; writes a run directory",
                       description="Train a model from a config file and write a run directory "
                                   "(config, metrics, checkpoints, manifest); prints test accuracy.")
    t.add_argument("config", help="YAML config file")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by its dotted path, e.g. train.epochs=3 (repeatable)")
    t.add_argument("--out", help="run directory (default: runs/<config name>); must not exist unless --resume")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--folds", type=int, metavar="K",
                   help="k-fold cross-validation: K runs in --out/fold_<k>, then mean and spread of each test metric")
    t.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    t.add_argument("--nproc", type=int, metavar="N", help="train in N processes on this machine through torchrun "
                   "(gloo on CPU, nccl on GPUs; train.parallel chooses ddp or fsdp)")
    t.add_argument("--nnodes", type=int, default=1, metavar="M", help="with --nproc: machines in the job (default 1)")
    t.add_argument("--node-rank", type=int, metavar="R", help="with --nnodes: this machine's number, 0 to M-1")
    t.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="with --nnodes: where the machines meet (node 0)")
    t.add_argument("--max-restarts", type=int, default=0, metavar="K",
                   help="with --nproc: restart the workers up to K times after a failure; they resume the run")

    e = sub.add_parser("evaluate", help="metrics of a trained run on a data split",
                       description="Loss and accuracy of a trained run on one split of its data.")
    e.add_argument("run", help="run directory written by `kiln train`")
    e.add_argument("--split", choices=["test", "val", "train"], default="test", help="data split (default: test)")
    e.add_argument("--json", action="store_true", help="print JSON instead of text")

    pr = sub.add_parser("predict", help="predict for files (images, table rows, source texts) or recommend for --user",
                        description="Predict for each input in the files, by the run's kind of data: an image run "
                                    "classifies image files (an MNIST run: PNG/JPEG converted to its input size, "
                                    "light backgrounds inverted; an image-folder run: JPEG/PNG/BMP/WebP... fitted "
                                    "as in training) or .npy arrays of pixels (uint8 0..255 or float "
                                    "0..1); a table run predicts each row of CSV or Parquet files (printed as CSV "
                                    "with the prediction columns added); a text-pairs run translates each line "
                                    "of text files (printed as source<TAB>target); a time-series run forecasts "
                                    "the steps after each history CSV (the series' latest rows); a "
                                    "text-classification run classifies each --text or each line of text files "
                                    "(printed as label<TAB>probability<TAB>text); a recommendation run lists "
                                    "the --top best items for each --user that the user has not interacted with.")
    pr.add_argument("run", help="run directory written by `kiln train`")
    pr.add_argument("files", nargs="*", help="image or .npy files; CSV or Parquet files of rows; text files of sources "
                                             "or of texts to classify")
    pr.add_argument("--text", action="append", default=[], help="a text to classify (repeatable; text-classification "
                                                                 "runs)")
    pr.add_argument("--user", action="append", default=[], metavar="ID",
                    help="recommendation runs: a user id of the training data (repeatable)")
    pr.add_argument("--top", type=int, default=10, help="with --user: how many items per user (default: 10)")
    pr.add_argument("--out", help="write what would be printed to this file instead (default: stdout)")
    pr.add_argument("--json", action="store_true", help="print JSON instead of text")

    g = sub.add_parser("generate", help="continue a prompt with a language-model run",
                       description="Generate text after a prompt with a run trained on data.dataset: text. "
                                   "Decoding is incremental (key/value cache) unless --no-cache.")
    g.add_argument("run", help="run directory written by `kiln train`")
    g.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    g.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most (default: 200)")
    g.add_argument("--temperature", type=float, default=1.0, help="0: greedy; higher: more random (default: 1)")
    g.add_argument("--top-k", type=int, help="sample among the k most likely tokens only")
    g.add_argument("--top-p", type=float, help="sample among the most likely tokens that sum to this probability")
    g.add_argument("--stop", action="append", default=[], help="end the text before this string (repeatable)")
    g.add_argument("--seed", type=int, help="random seed: the same seed gives the same text")
    g.add_argument("--no-cache", action="store_true", help="recompute the whole context for every token")
    g.add_argument("--json", action="store_true", help="print JSON instead of text")

    s = sub.add_parser("summary", help="table of blocks, output shapes, parameters and multiply-adds",
                       description="Print the model's blocks with output shapes, parameters and multiply-adds "
                                   "per sample, from a config file or a run directory.")
    s.add_argument("target", help="YAML config file or run directory")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value before building")

    lf = sub.add_parser("lr-find", help="sweep the learning rate, plot loss against it (PNG) and suggest one",
                        description="Train the config's model for --steps steps on its training data while the "
                                    "learning rate grows exponentially from --start to --end; plot the smoothed loss "
                                    "against the rate and suggest one (steepest: where the loss falls fastest; "
                                    "min10: a tenth of the rate at the lowest loss). Writes no run: only the plot and "
                                    "its JSON. train.optimizer.lr: auto runs the same sweep before training.")
    lf.add_argument("config", help="YAML config file")
    lf.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value by its dotted path (repeatable)")
    lf.add_argument("--steps", type=int, default=200, help="steps of the sweep (default: 200)")
    lf.add_argument("--start", type=float, default=1e-7, help="first learning rate (default: 1e-7)")
    lf.add_argument("--end", type=float, default=10.0, help="last learning rate (default: 10)")
    lf.add_argument("--method", choices=["min10", "steepest"], default="min10",
                    help="which rate to suggest (default: min10)")
    lf.add_argument("--out", help="the plot, a .png file; its JSON goes beside it (default: beside the config, "
                                  "<config>.lr_find.png)")
    lf.add_argument("--json", action="store_true", help="print the sweep as JSON")
    _add_serving_commands(sub)
    rp = sub.add_parser("report", help="write a run's model card: one self-contained HTML file",
                        description="Write the run's model card, one HTML file that needs no network: data summary, "
                                    "config, learning curves, confusion matrix or predicted-vs-true plot, per-class "
                                    "metrics, calibration, the worst test errors, and the explanations, fairness "
                                    "audit, privacy budget, compression and export figures the run holds.")
    rp.add_argument("run", help="run directory written by `kiln train`")
    rp.add_argument("--out", help="the HTML file to write (default: <run>/report.html)")

    a = sub.add_parser("audit", help="fairness of a binary table run across the groups of sensitive columns",
                       description="Per-group selection rate, accuracy, TPR, FPR and ROC-AUC (Fairlearn MetricFrame), "
                                   "demographic-parity and equalized-odds differences and ratios, with bootstrap 95% "
                                   "intervals and group sizes; writes <run>/audit.json and audit.svg. A sensitive "
                                   "column may be any column of the data: COLUMN, COLUMN:VALUE=GROUP,... (a map), "
                                   "COLUMN:EDGE,... (numeric cuts, e.g. age:25); a numeric column with more than "
                                   "--bins values is cut at quantiles. Needs the fairness extra.")
    a.add_argument("run", help="run directory written by `kiln train`")
    a.add_argument("--sensitive", action="append", default=[], metavar="COLUMN[:SPEC]",
                   help="a column to group rows by (repeatable), e.g. foreign, age:25, "
                        "personal_status_and_sex:A91=male,A92=female,A93=male,A94=male,A95=female")
    a.add_argument("--split", choices=["test", "val", "train"], default="test", help="rows to audit (default: test)")
    a.add_argument("--bins", type=int, default=4, help="quantile bins of a numeric column without edges (default: 4)")
    a.add_argument("--bootstrap", type=int, default=1000, help="resamples for the 95%% intervals (default: 1000)")
    a.add_argument("--seed", type=int, default=0, help="seed of the resamples and of randomised thresholds")
    a.add_argument("--fit-thresholds", action="store_true",
                   help="fit per-group thresholds (Fairlearn ThresholdOptimizer) on the validation split for the "
                        "first --sensitive column, save them (fairness.json) and turn them on for predict and serve")
    a.add_argument("--constraint", choices=["demographic_parity", "equalized_odds"], default="demographic_parity",
                   help="what --fit-thresholds equalises (default: demographic_parity)")
    a.add_argument("--thresholds", choices=["on", "off"], help="turn saved per-group thresholds on or off")
    a.add_argument("--json", action="store_true", help="print audit.json instead of the table")

    tu = sub.add_parser("tune", help="search hyperparameters with Optuna (needs the tune extra)",
                        description="Tune a config over a search space (dotted config keys with float/int ranges and "
                                    "choices) with Optuna's TPE sampler, pruning bad trials on their validation "
                                    "metric. The study is stored in --out/study.journal (or --storage) and shared "
                                    "by --workers processes or several commands; the same command run again "
                                    "continues it up to --trials. Writes best.yaml, trials.csv/.md, "
                                    "importances.json, history.svg and tune.json to --out.")
    tu.add_argument("config", help="YAML config file")
    tu.add_argument("--space", required=True, help="YAML search space: {dotted.key: {float|int: [low, high], log: "
                                                   "true} | {choice: [a, b]}, with optional when: {key: value}}")
    tu.add_argument("--trials", type=int, required=True, help="finished trials the study should have in all")
    tu.add_argument("--storage", help="journal file path, sqlite:///FILE or postgresql+psycopg://USER:PW@HOST/DB "
                                      "(default: --out/study.journal)")
    tu.add_argument("--workers", type=int, default=1, help="processes working on the study at once (default: 1)")
    tu.add_argument("--folds", type=int, metavar="K", help="score each trial by K-fold cross-validation")
    tu.add_argument("--pruner", choices=["median", "hyperband", "none"], default="median",
                    help="stop trials that do worse than others at the same epoch or fold (default: median)")
    tu.add_argument("--metric", default="auto", help="metric to optimise (default auto: roc_auc for binary tasks, "
                                                     "accuracy for classes, rmse for regression, ...)")
    tu.add_argument("--study", help="study name (default: the config's name)")
    tu.add_argument("--out", help="output folder (default: runs/<config name>-tune)")
    tu.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value before tuning (repeatable)")
    tu.add_argument("--json", action="store_true", help="print the summary as JSON")
    tu.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a process started by --workers
    c = sub.add_parser("compress", help="a smaller, faster copy of a run: distil, prune, quantize (a new run)",
                       description="Write a NEW run made smaller and faster from RUN: --distill trains a student "
                                   "config on RUN's soft targets, --prune removes channels and heads (then "
                                   "fine-tunes), --quantize makes it int8 (ONNX Runtime); in that order. Each step is "
                                   "measured (parameters, file size, test accuracy, batch 1 and 64 latency) into "
                                   "compression.json; it is refused, writing nothing, when test accuracy drops "
                                   "more than --max-drop points.")
    c.add_argument("run", help="run directory written by `kiln train`")
    c.add_argument("--prune", type=float, metavar="FRACTION", help="fraction of channels/units/heads to remove "
                                                                    "from each prunable layer, e.g. 0.5")
    c.add_argument("--structured", action="store_true", help="structured pruning (whole channels; the only kind)")
    c.add_argument("--finetune-epochs", type=int, default=2, help="epochs of fine-tuning after pruning (default: 2)")
    c.add_argument("--quantize", choices=["int8", "int8-static"], help="int8: dynamic (dense, LSTM); int8-static: "
                                                                       "calibrated on training samples (conv, dense)")
    c.add_argument("--distill", metavar="STUDENT_CONFIG", help="YAML with the student's model (and train) sections")
    c.add_argument("--temperature", type=float, default=4.0, help="distillation temperature (default: 4)")
    c.add_argument("--alpha", type=float, default=0.7, help="weight of the teacher's soft targets (default: 0.7)")
    c.add_argument("--max-drop", type=float, default=0.5, help="largest test-accuracy loss in points (default: 0.5)")
    c.add_argument("--no-latency", action="store_true", help="skip the latency measurements")
    c.add_argument("--out", help="the new run directory (default: RUN_compressed)")
    c.add_argument("--json", action="store_true", help="print compression.json")
    return p


def _add_serving_commands(sub) -> None:
    sv = sub.add_parser("serve", help="serve a run over HTTP (needs the serve extra)",
                        description="Serve a trained run: POST /v1/predict, GET /v1/model, /healthz, /readyz, "
                                    "/metrics, /openapi.json (language models also OpenAI's POST /v1/completions "
                                    "and GET /v1/models). Concurrent requests share micro-batches.")
    sv.add_argument("run", help="run directory written by `kiln train`")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    sv.add_argument("--workers", type=int, default=1, help="server processes, each with its own model (default: 1)")
    sv.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                    help="torch (a traced, frozen TorchScript copy of the model when it matches the eager one), "
                         "or onnx (ONNX Runtime, image, table and text-classification runs; run `kiln export RUN` "
                         "first)")
    sv.add_argument("--max-batch", type=int, default=64, help="most rows in one forward pass (default: 64)")
    sv.add_argument("--max-wait-ms", type=float, default=2.0,
                    help="longest a request waits for others that are still arriving to share its batch; "
                         "a lone request never waits (default: 2)")
    sv.add_argument("--max-instances", type=int, default=256, help="most instances per request (default: 256)")
    sv.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body in MiB (default: 8)")
    sv.add_argument("--max-queue-tokens", type=int, default=65536,
                    help="language models, /v1/completions: most tokens (prompt + max_tokens) queued or being "
                         "written; beyond it requests get 503 (default: 65536)")
    sv.add_argument("--threads", type=_threads, default="auto",
                    help="intra-op threads of the backend (default: auto: the CPUs this process may use, less one "
                         "for the event loop)")
    sv.add_argument("--api-key-env", metavar="NAME",
                    help="require the API key held in this environment variable (X-API-Key or Bearer)")

    ex = sub.add_parser("export", help="export a run's model (ONNX, else torch.export), checked against PyTorch",
                        description="Export the run's model to <run>/model.onnx (ONNX) or <run>/model.pt2 "
                                    "(torch.export); the file is kept only if its outputs match PyTorch's on the "
                                    "check data (max abs difference <= tolerance). The default, auto, writes ONNX "
                                    "and falls back to torch.export when ONNX fails for this model, saying why.")
    ex.add_argument("run", help="run directory written by `kiln train`")
    ex.add_argument("--format", choices=["auto", "onnx", "torch-export", "hf"], default="auto",
                    help="auto: onnx, else torch-export when ONNX fails for this model; onnx: model.onnx for ONNX "
                         "Runtime; torch-export: model.pt2 for torch.export.load; hf: a language-model run as a "
                         "Hugging Face GPT-2 folder (<run>/hf, or --out), not checked (default: auto)")
    ex.add_argument("--out", help="output file (default: <run>/model.onnx or <run>/model.pt2); with auto, a name "
                                  "ending in .onnx or .pt2 picks that format")
    ex.add_argument("--check", choices=["test", "val", "train", "random"], default="test",
                    help="data to compare outputs on (default: test)")
    ex.add_argument("--tolerance", type=float, default=1e-4, help="largest absolute difference (default: 1e-4)")

    xp = sub.add_parser("explain", help="attributions: which pixels, columns or tokens made the model answer so",
                        description="Explain a run's answer for each input (files as `kiln predict` reads them: "
                                    "images, CSV/Parquet rows, text lines) with Captum: an image's attribution "
                                    "overlay (PNG), a table row's columns ranked (SVG), a text's tokens coloured "
                                    "(HTML), and a JSON each, in <run>/explanations or --out. --global ranks a "
                                    "table run's columns over its test split. Runs on PyTorch's operators (the "
                                    "fused native kernels compute no gradients). Needs the explain extra.")
    xp.add_argument("run", help="run directory written by `kiln train`")
    xp.add_argument("inputs", nargs="*", metavar="INPUT", help="image or .npy files; CSV or Parquet files of rows; "
                                                               "text files (one text a line)")
    xp.add_argument("--method", choices=["integrated_gradients", "saliency", "occlusion", "shap"], default=None,
                    help="attribution method (default: integrated_gradients; with --global: occlusion)")
    xp.add_argument("--target", help="the class to explain (default: the predicted class)")
    xp.add_argument("--out", help="folder for the explanations (default: <run>/explanations)")
    xp.add_argument("--global", dest="global_", action="store_true",
                    help="table runs: rank the columns by mean |attribution| over the test split")
    xp.add_argument("--limit", type=int, help="explain the first N inputs only (an IDX file's images, CSV rows, "
                                              "text lines); with --global: rows of the split read (default: 1000)")
    xp.add_argument("--json", action="store_true", help="print the JSON records instead of a summary")
    im = sub.add_parser("import", help="make a kiln run from a Hugging Face GPT-2 folder",
                        description="Make a finished kiln run from another library's checkpoint. hf-gpt2: a folder "
                                    "saved by transformers' GPT2LMHeadModel (config.json, model.safetensors, and "
                                    "tokenizer.json or vocab.json + merges.txt); the run generates, serves and "
                                    "exports like a trained one.")
    im.add_argument("format", choices=["hf-gpt2"], help="what the folder holds")
    im.add_argument("dir", help="the checkpoint folder")
    im.add_argument("--out", help="run directory to create (default: runs/<folder name>)")
    im.add_argument("--data", metavar="PATH", help="a text file or folder for the run's data.path: `kiln evaluate` "
                                                   "measures the model on its last 10%% (default: none)")

    d = sub.add_parser("deploy", help="write a Docker build context and/or Kubernetes manifests",
                       description="Write a Dockerfile (slim, non-root, HEALTHCHECK) with the run, and/or a "
                                   "Kubernetes Deployment, Service and HorizontalPodAutoscaler.")
    d.add_argument("run", help="run directory written by `kiln train` (with --k8s-train: a run or a config file)")
    d.add_argument("--docker", metavar="DIR", help="write the Docker build context here")
    d.add_argument("--k8s", metavar="DIR", help="write the Kubernetes manifests here")
    d.add_argument("--image", help="image for the Deployment (default: <run name>:latest)")
    d.add_argument("--backend", choices=["torch", "onnx"], default="torch", help="serving backend in the image")
    d.add_argument("--wheel", help="a kiln wheel to install in the image (default: kiln[serve] from the index)")
    d.add_argument("--api-key-env", metavar="NAME",
                   help="the server requires the API key held in this environment variable; the Deployment "
                        "sets it from the Secret <run name>-api-key (entry api-key), which you create")
    d.add_argument("--k8s-train", metavar="DIR", help="write manifests that train the config on a cluster here: a "
                   "Kubeflow PyTorchJob, and an indexed Job with a headless Service for clusters without the operator")
    d.add_argument("--nodes", type=int, default=1, metavar="N", help="with --k8s-train: pods (machines) (default 1)")
    d.add_argument("--nproc-per-node", type=int, default=1, metavar="M",
                   help="with --k8s-train: training processes per pod (default 1)")
    d.add_argument("--gpus-per-node", type=int, default=0, metavar="G", help="with --k8s-train: GPUs per pod")
    d.add_argument("--runs-pvc", metavar="CLAIM", help="with --k8s-train: a ReadWriteMany PersistentVolumeClaim "
                   "for the run directory (default: an emptyDir, lost with the pods)")


def _threads(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected auto or a count of at least 1, not {text!r}")
    return int(text)


def cmd_serve(args) -> None:
    from kiln.serve import ServeSettings, serve

    settings = ServeSettings(backend=args.backend, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                             max_instances=args.max_instances, max_body_bytes=int(args.max_body_mb * 2**20),
                             api_key_env=args.api_key_env, threads=args.threads,
                             max_queue_tokens=args.max_queue_tokens)
    serve(args.run, settings, host=args.host, port=args.port, workers=args.workers)


def cmd_import(args) -> None:
    from kiln.hf import import_gpt2

    r = import_gpt2(args.dir, out=args.out, data=args.data)
    print(f"wrote {r['run']}: GPT-2 with {r['parameters']:,} parameters, tokenizer from {r['tokenizer']}")
    for note in r["notes"]:
        print(f"note: {note}")


def cmd_export(args) -> None:
    from kiln.export import export_run

    if args.format == "hf":
        from kiln.hf import export_gpt2

        r = export_gpt2(args.run, out=args.out)
        print(f"wrote {r['path']}: {', '.join(r['files'])} (GPT2LMHeadModel.from_pretrained reads it)")
        for note in r["notes"]:
            print(f"note: {note}")
        return
    r = export_run(args.run, args.format, out=args.out, check=args.check, tolerance=args.tolerance)
    print(f"wrote {r['path']} ({r['format']}): max abs difference from PyTorch {r['max_abs_diff']:.2e} on "
          f"{r['samples']} {r['check']} samples (tolerance {r['tolerance']:g})")
    if "fallback_reason" in r:
        print(f"ONNX was not used: {r['fallback_reason']}")


def cmd_compress(args) -> None:
    from kiln.compress import compress, summary_lines

    r = compress(args.run, prune=args.prune, structured=args.structured, quantize=args.quantize,
                 distill=args.distill, max_drop=args.max_drop, out=args.out, finetune_epochs=args.finetune_epochs,
                 temperature=args.temperature, alpha=args.alpha, latency=not args.no_latency)
    print(json.dumps(r, indent=2) if args.json else "\n".join(summary_lines(r)))


def cmd_deploy(args) -> None:
    from kiln.deploy import SECRET_ENTRY, api_key_secret, deploy_docker, deploy_k8s

    if not (args.docker or args.k8s or args.k8s_train):
        raise KilnError("give --docker DIR and/or --k8s DIR, or --k8s-train DIR")
    if args.k8s_train:
        from kiln.deploy.train import deploy_k8s_train

        deploy_k8s_train(args.run, args.k8s_train, nodes=args.nodes, nproc_per_node=args.nproc_per_node,
                         image=args.image, gpus=args.gpus_per_node, runs_pvc=args.runs_pvc)
        print(f"wrote {args.k8s_train}: with the Kubeflow training operator: kubectl apply -f "
              f"{args.k8s_train}/configmap.yaml -f {args.k8s_train}/pytorchjob.yaml; without it: kubectl apply -f "
              f"{args.k8s_train}/configmap.yaml -f {args.k8s_train}/service.yaml -f {args.k8s_train}/job.yaml")
        if not (args.docker or args.k8s):
            return
    if args.docker:
        deploy_docker(args.run, args.docker, backend=args.backend, wheel=args.wheel, api_key_env=args.api_key_env)
        print(f"wrote {args.docker}: docker build -t IMAGE {args.docker}")
    if args.k8s:
        deploy_k8s(args.run, args.k8s, image=args.image, api_key_env=args.api_key_env)
        if args.api_key_env:
            print(f"the Deployment reads the API key from a Secret; create it first: kubectl create secret generic "
                  f"{api_key_secret(args.run)} --from-literal={SECRET_ENTRY}=KEY")
        print(f"wrote {args.k8s}: kubectl apply -f {args.k8s}")


def cmd_explain(args) -> None:
    from kiln.run import Run

    run = Run.load(args.run)
    if args.global_:
        result = run.explain_global(args.method or "occlusion", limit=args.limit or 1000, out=args.out)
        if args.json:
            print(json.dumps(result, indent=2))
            return
        print(f"column importance ({result['method']}, mean |attribution| over {result['rows']} test rows):")
        for c in result["columns"]:
            print(f"  {c['rank']:3d}. {c['column']:30s} {c['importance']:.6g}")
        print(f"wrote {', '.join(result['files'])}")
        return
    records = run.explain(args.inputs, args.method or "integrated_gradients", out=args.out, target=args.target,
                          limit=args.limit)
    if args.json:
        print(json.dumps(records, indent=2))
        return
    for r in records:
        what = r.get("class", f"value {r.get('prediction')}")
        gap = f", completeness gap {r['completeness_gap']:.2%}" if "completeness_gap" in r else ""
        if r.get("completeness_gap", 0) > r.get("completeness_tolerance", 1):
            gap += f" after {r['steps']} steps: the output changes steeply between baseline and input"
        top = r.get("columns") or sorted(r.get("tokens", []), key=lambda t: -abs(t["attribution"]))
        best = ", ".join(f"{t.get('column', t.get('token'))!s}: {t['attribution']:+.3g}" for t in top[:3])
        print(f"{r['files'][1]}: {what} ({r['method']}{gap}){'  top: ' + best if best else ''}")
    print("computed with PyTorch's operators (kiln's fused native kernels compute no gradients)")


def _version() -> str:
    from kiln.version import __version__

    return __version__


def cmd_generate(args) -> None:
    from kiln.run import Run

    text = Run.load(args.run).generate(args.prompt, args.max_new_tokens, temperature=args.temperature,
                                       top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop,
                                       cache=not args.no_cache)
    print(json.dumps({"prompt": args.prompt, "text": text}) if args.json else args.prompt + text)


def cmd_train(args) -> None:
    from kiln.api import train
    from kiln.training.metrics import metrics_line

    if args.folds is not None:
        _train_folds(args)
        return
    if args.nproc is not None:
        _train_processes(args)
        return
    run = train(args.config, args.overrides, out=args.out, resume=args.resume)
    if os.environ.get("RANK", "0") != "0":  # one of torchrun's workers: rank 0 reports
        return
    if args.json:
        print(json.dumps({"run": str(run.path), **run.metrics}, indent=2))
    else:
        test = metrics_line(run.metrics["test"]) or "(no held-out data: data.val_fraction is 0)"
        print(f"test {test}  run {run.path}")


def _train_processes(args) -> None:
    """--nproc: the same `kiln train` in N workers through torchrun (kiln.training.distributed.launch)."""
    from kiln.training.distributed import launch

    worker = [args.config, *[a for o in args.overrides for a in ("--set", o)], *(["--out", args.out] if args.out else []),
              *(["--resume"] if args.resume else []), *(["--json"] if args.json else [])]
    code = launch(worker, args.nproc, args.nnodes, args.node_rank, args.rdzv_endpoint, args.max_restarts)
    if code:
        raise KilnError(f"the distributed training failed (torchrun exit status {code}); the workers' errors are "
                        "above" + ("" if args.resume else "; continue it with the same command and --resume"))


def _train_folds(args) -> None:
    from kiln.api import train_folds

    if args.resume or args.folds < 2:
        raise KilnError("--folds needs K >= 2 and cannot be combined with --resume")
    results = train_folds(args.config, args.folds, args.overrides, out=args.out)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{args.folds}-fold cross-validation, test metrics (mean +- std over folds):")
    for name, m in results["test"].items():
        if name != "samples":
            print(f"  {name:10s} {m['mean']:.4f} +- {m['std']:.4f}")


def cmd_evaluate(args) -> None:
    from kiln.run import Run
    from kiln.training.metrics import metrics_line

    metrics = Run.load(args.run).evaluate(args.split)
    if args.json:
        print(json.dumps({"split": args.split, **metrics}))
    else:
        count = metrics.get("samples", metrics.get("tokens"))
        print(f"{args.split}: {metrics_line(metrics)}  ({count} {'samples' if 'samples' in metrics else 'tokens'})")


def cmd_predict(args) -> None:
    from kiln.fsutil import atomic_write_text
    from kiln.run import Run

    run = Run.load(args.run)
    if args.user:
        records = run.recommend(args.user, args.top)
    else:
        records = run.predict_texts(args.text) if args.text else []
        records += run.predict_files(args.files) if args.files else []
    text = json.dumps(records, indent=2) + "\n" if args.json else run.kind.render(records)
    if args.out:
        atomic_write_text(args.out, text)
    else:
        sys.stdout.write(text)


def cmd_report(args) -> None:
    from kiln.report import write_report

    print(f"wrote {write_report(args.run, args.out)}")


def cmd_audit(args) -> None:
    from kiln.audit import audit, render, set_thresholds, warn

    if args.thresholds:
        rules = set_thresholds(args.run, args.thresholds == "on")
        print(f"per-group thresholds on {rules.grouping.spec} ({rules.constraint}) are {args.thresholds}")
        if not args.sensitive:
            return
    report = audit(args.run, args.sensitive, args.split, args.bins, args.bootstrap, args.seed,
                   args.constraint if args.fit_thresholds else None)
    print(json.dumps(report, indent=2) if args.json else render(report), end="" if not args.json else "\n")
    sys.stdout.flush()
    warn(report)


def cmd_lr_find(args) -> None:
    from kiln.lrfind import lr_find

    r = lr_find(args.config, args.overrides, out=args.out, steps=args.steps, start=args.start, end=args.end,
                method=args.method)
    if args.json:
        print(json.dumps(r, indent=2))
        return
    print(f"suggested learning rate {r['suggestion']:.3g} ({r['method']}; steepest {r['steepest']:.3g}, min10 "
          f"{r['min10']:.3g}); {len(r['lrs'])} steps from {r['start']:g}, {r['stopped']}")
    print(f"wrote {r['plot']} and {r['json']}")


def cmd_summary(args) -> None:
    from kiln.config import load_config
    from kiln.rundir import RunDir, open_run_dir
    from kiln.summary import model_of, print_summary

    target = Path(args.target)
    path = open_run_dir(target) / RunDir.CONFIG if target.is_dir() else target
    cfg = load_config(path, args.overrides)
    print_summary(model_of(cfg), f"{cfg.name} ({path})")


def cmd_tune(args) -> None:
    from kiln.tuning import tune, work_only

    if args.worker:
        work_only(args.config, args.space, args.trials, storage=args.storage, study=args.study, out=args.out,
                  metric=args.metric, folds=args.folds, pruner=args.pruner)
        return
    r = tune(args.config, args.space, args.trials, storage=args.storage, workers=args.workers, folds=args.folds,
             pruner=args.pruner, metric=args.metric, study=args.study, out=args.out, overrides=args.overrides)
    if args.json:
        print(json.dumps(r, indent=2, default=str))
        return
    counts = ", ".join(f"{n} {state}" for state, n in r["trials"].items())
    print(f"study {r['study']} ({r['storage']}): {counts}")
    if r["best"]:
        b = r["best"]
        spread = f" (folds: {', '.join(f'{v:.4f}' for v in b['folds'])})" if b.get("folds") else ""
        print(f"best: trial {b['number']}, {r['metric']} {b['value']:.4f}{spread}")
        for k, v in b["params"].items():
            print(f"  {k}: {v}")
        print(f"config: {b['config']}  (kiln train {b['config']})")
    imp = r.get("importances", {})
    print("importances: " + (imp["error"] if "error" in imp else ", ".join(f"{k} {v:.2f}" for k, v in imp.items())))


# Each command's function, by name; one line per command.
COMMANDS = {
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "predict": cmd_predict,
    "summary": cmd_summary,
    "serve": cmd_serve,
    "export": cmd_export,
    "deploy": cmd_deploy,
    "generate": cmd_generate,
    "report": cmd_report,
    "audit": cmd_audit,
    "tune": cmd_tune,
    "explain": cmd_explain,
    "compress": cmd_compress,
    "import": cmd_import,
    "lr-find": cmd_lr_find,
}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "predict" and not (args.files or args.text or args.user):
        parser.error("predict: give the files to predict for, --text TEXT (text-classification runs) or --user ID "
                     "(recommendation runs)")
    if args.command == "explain" and not (args.inputs or args.global_):
        parser.error("explain: give the inputs to explain, or --global (table runs)")
    if args.command == "predict" and args.user and (args.files or args.text):
        parser.error("predict: --user (a recommendation run) takes no files or --text")
    try:
        COMMANDS[args.command](args)
    except KilnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def entry() -> None:
    """The ``kiln`` command: ``main``, then an exit that skips the interpreter's teardown.

    A finished command has written its files (atomically, all closed) and only its output is left to
    flush. Tearing down the interpreter afterwards frees PyTorch's modules and objects one by one: 0.6 to
    0.8 s of every call here (`python -c "import torch"` takes 3.1-3.3 s, with ``os._exit`` 2.5-2.6 s),
    more than some commands take. Exceptions, ``--help`` and argument errors exit the usual way."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
