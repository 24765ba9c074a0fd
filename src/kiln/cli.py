"""The ``kiln`` command: a thin layer over the Python API (kiln.train, kiln.Run)."""

from __future__ import annotations

import argparse
import json
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
  kiln summary examples/mnist_seed.yaml
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

    e = sub.add_parser("evaluate", help="metrics of a trained run on a data split",
                       description="Loss and accuracy of a trained run on one split of its data.")
    e.add_argument("run", help="run directory written by `kiln train`")
    e.add_argument("--split", choices=["test", "val", "train"], default="test", help="data split (default: test)")
    e.add_argument("--json", action="store_true", help="print JSON instead of text")

    pr = sub.add_parser("predict", help="classify image files (PNG/JPEG) or .npy arrays",
                        description="Predict the class of each file: PNG/JPEG images (converted to the model's "
                                    "input size; light backgrounds are inverted) or .npy arrays of pixels "
                                    "(uint8 0..255 or float 0..1).")
    pr.add_argument("run", help="run directory written by `kiln train`")
    pr.add_argument("files", nargs="+", help="image or .npy files; for a table run, CSV or Parquet files of rows")
    pr.add_argument("--out", help="table runs: write the rows with prediction columns to this CSV (default: stdout)")
    pr.add_argument("--json", action="store_true", help="print JSON instead of text")

    s = sub.add_parser("summary", help="table of blocks, output shapes, parameters and multiply-adds",
                       description="Print the model's blocks with output shapes, parameters and multiply-adds "
                                   "per sample, from a config file or a run directory.")
    s.add_argument("target", help="YAML config file or run directory")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value before building")
    return p


def _version() -> str:
    from kiln import __version__

    return __version__


def cmd_train(args) -> None:
    import kiln

    if args.folds is not None:
        _train_folds(args)
        return
    run = kiln.train(args.config, args.overrides, out=args.out, resume=args.resume)
    test = run.metrics["test"]
    if args.json:
        print(json.dumps({"run": str(run.path), **run.metrics}, indent=2))
    elif "accuracy" in test:
        print(f"test accuracy {test['accuracy'] * 100:.2f}%  test loss {test['loss']:.4f}  run {run.path}")
    else:
        print(f"test rmse {test['rmse']:.4g}  mae {test['mae']:.4g}  r2 {test['r2']:.4f}  run {run.path}")


def _train_folds(args) -> None:
    from kiln.train.folds import train_folds

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

    metrics = Run.load(args.run).evaluate(args.split)
    if args.json:
        print(json.dumps({"split": args.split, **metrics}))
    elif "accuracy" in metrics:
        print(f"{args.split}: accuracy {metrics['accuracy'] * 100:.2f}%  loss {metrics['loss']:.4f}  "
              f"({metrics['samples']} samples)")
    else:
        print(f"{args.split}: rmse {metrics['rmse']:.4g}  mae {metrics['mae']:.4g}  r2 {metrics['r2']:.4f}  "
              f"({metrics['samples']} samples)")


def cmd_predict(args) -> None:
    from kiln.run import Run

    run = Run.load(args.run)
    if run.config.data.dataset == "tabular":
        _predict_tables(run, args)
        return
    results = run.predict_files(args.files)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for r in results:
        probs = "  ".join(f"{k}:{v:.3f}" for k, v in r["probabilities"].items())
        print(f"{r['file']}: {r['class']} ({r['probability'] * 100:.1f}%)  {probs}")


def _predict_tables(run, args) -> None:
    from kiln.data.table import read_table
    from kiln.fsutil import atomic_write_text

    if args.json:
        rows = [r for f in args.files for r in run.predict_table(read_table(Path(f)))]
        print(json.dumps(rows, indent=2))
        return
    text = "".join(run.predict_csv(f) if i == 0 else run.predict_csv(f).split("\n", 1)[1]
                   for i, f in enumerate(args.files))
    if args.out:
        atomic_write_text(args.out, text)
    else:
        sys.stdout.write(text)


def cmd_summary(args) -> None:
    from kiln.config import load_config
    from kiln.run import RunDir, open_run_dir
    from kiln.summary import model_of, print_summary

    target = Path(args.target)
    path = open_run_dir(target) / RunDir.CONFIG if target.is_dir() else target
    cfg = load_config(path, args.overrides)
    print_summary(model_of(cfg), f"{cfg.name} ({path})")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "summary": cmd_summary}[args.command](args)
    except KilnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
