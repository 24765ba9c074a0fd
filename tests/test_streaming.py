"""Tables bigger than memory: Parquet/CSV shards read as a stream (kind ``tabular_stream``, plan ``stream``)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
import yaml

import kiln
from kiln.data.kind import open_kind
from kiln.data.preprocess import fit
from kiln.data.shards import ShardSet, reader_shards, stream_rows, table_reader
from kiln.data.table import read_table
from kiln.data.table_stream import ArrowTransform, TabularStreamData
from kiln.errors import ConfigError, DataError

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_streaming import make_shards


def stream_config(path, **train) -> dict:
    return {"name": "stream", "seed": 0,
            "data": {"dataset": "tabular_stream", "path": str(path), "target": "y", "shuffle_rows": 3000},
            "model": {"blocks": [{"type": "tabular_encoder"}, {"type": "dense", "units": 32, "activation": "relu"},
                                 {"type": "classifier"}]},
            "train": {"epochs": 2, "batch_size": 256, "threads": 1, "log_every": 20, **train}}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    make_shards(folder, 40_000, 20)
    return folder


def _kind(path, **data):
    cfg = TabularStreamData(path=str(path), target="y", **data)
    return open_kind(cfg, 0)


def test_streamed_training_learns_the_signal_and_reopens_as_a_table_run(shards, tmp_path):
    run = kiln.train(stream_config(shards), out=tmp_path / "run", live=False)
    assert run.metrics["test"]["accuracy"] > 0.86  # a logistic model of the generating rule gets about 0.9
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert manifest["samples"] == {"train": 36_000, "val": 2_000, "test": 2_000}  # 18 / 1 / 1 shards of 2000
    # Everything after training reads the run directory: evaluate streams the test shard again.
    again = kiln.Run.load(run.path)
    assert again.evaluate("test")["accuracy"] == pytest.approx(run.metrics["test"]["accuracy"])
    with pytest.raises(DataError, match="training rows are not held in memory"):
        again.evaluate("train")
    rows = pq.read_table(shards / "part-019.parquet").slice(0, 3).to_pylist()
    assert len(again.kind.predict_rows(again, rows)) == 3


def test_streaming_and_in_memory_fit_the_same_statistics_and_inputs(shards, tmp_path):
    """The one-pass statistics equal those fitted on the same rows in memory (tabular kind's ``fit``), and the
    vectorised transform gives the same model input as the text path."""
    kind = _kind(shards)
    one = tmp_path / "train.parquet"
    pq.write_table(pa.concat_tables([pq.read_table(shards / f"part-{i:03d}.parquet") for i in range(18)]), one)
    table = read_table(one)
    prep, _ = fit(table, "y", "auto", {}, None)
    assert prep.target.classes == kind.prep.target.classes and prep.target.counts == kind.prep.target.counts
    for a, b in zip(prep.columns, kind.prep.columns, strict=True):
        assert (a.name, a.type, a.categories) == (b.name, b.type, b.categories)
        assert a.mean == pytest.approx(b.mean, rel=1e-9) and a.std == pytest.approx(b.std, rel=1e-9)
    head = pq.read_table(one).slice(0, 500)
    x, y = ArrowTransform(kind.prep)(head.to_batches()[0])
    torch.testing.assert_close(torch.from_numpy(x), prep.transform(table.take(list(range(500)))))
    assert (torch.from_numpy(y) == prep.encode_target(table.take(list(range(500))))).all()


def test_ple_bins_come_from_a_sample_close_to_the_exact_quantiles(shards):
    kind = _kind(shards, numeric_encoding="ple", bins=8, sample_rows=5000)
    x0 = np.concatenate([pq.read_table(shards / f"part-{i:03d}.parquet")["x0"].to_numpy() for i in range(18)])
    exact = np.quantile(x0, np.linspace(0, 1, 9))[1:-1]
    assert np.abs(np.array(kind.prep.columns[0].edges[1:-1]) - exact).max() < 0.1


def _rows(kind, epoch, start=0, rank=0, world=1, block=3000):
    owned = reader_shards(kind.parts["train"], rank, world)
    read = table_reader(kind.shard_set(), kind.transform, kind.transform.columns)
    counts = [s.rows for s in kind.shard_set().shards]
    blocks = stream_rows(read, counts, owned, seed=0, epoch=epoch, reader=rank, block_rows=block, start=start)
    return np.concatenate([x for x, _ in blocks])


def test_the_order_is_reproducible_and_resumes_at_the_right_row(shards):
    kind = _kind(shards)
    full = _rows(kind, epoch=0)
    assert len(full) == 36_000
    assert np.array_equal(full, _rows(kind, epoch=0))  # the same seed, the same order
    assert not np.array_equal(full, _rows(kind, epoch=1))  # each epoch its own order
    for start in (1, 2999, 3000, 4001, 35_999):  # within and at block and shard boundaries
        assert np.array_equal(_rows(kind, epoch=0, start=start), full[start:]), start
    # The shuffle mixes across a block: the first rows do not come in the shard's own order.
    first_shard = kind.transform(pq.read_table(kind.shard_set().shards[0].path).to_batches()[0])[0]
    assert not np.array_equal(full[:100], first_shard[:100])


def test_ranks_and_workers_share_out_whole_shards(shards):
    kind = _kind(shards)
    train = kind.parts["train"]
    owned = [reader_shards(train, r, 2, w, 3) for r in range(2) for w in range(3)]
    assert sorted(s for part in owned for s in part) == train  # every shard once
    parts = [_rows(kind, 0, rank=r, world=2) for r in range(2)]
    assert len(parts[0]) + len(parts[1]) == 36_000
    both = np.concatenate(parts)
    assert len(np.unique(both, axis=0)) == len(np.unique(_rows(kind, 0), axis=0))
    with pytest.raises(ConfigError, match="18 training shards cannot be shared among 4 processes x 5 readers"):
        reader_shards(train, 0, 4, 0, 5)


def test_a_streamed_run_killed_mid_epoch_resumes_to_the_same_weights(shards, tmp_path):
    from test_resume import _assert_same_run, _kill_after_a_checkpoint

    config = tmp_path / "s.yaml"
    config.write_text(yaml.safe_dump(stream_config(shards, checkpoint_every=30, epochs=2,
                                                   schedule={"name": "cosine"})))
    reference = kiln.train(config, out=tmp_path / "reference", live=False)
    step = _kill_after_a_checkpoint(config, tmp_path / "killed")
    assert 0 < step < 2 * 141 and step % 141, "must resume from mid-epoch"  # ceil(36000 / 256) steps an epoch
    resumed = kiln.train(config, out=tmp_path / "killed", resume=True, live=False)
    _assert_same_run(resumed, reference, "epoch")


def test_in_memory_shards_train_the_same_rows(shards, tmp_path):
    cfg = stream_config(shards, epochs=1)
    cfg["data"]["stream"] = False
    run = kiln.train(cfg, out=tmp_path / "mem", live=False)
    assert run.metrics["test"]["accuracy"] > 0.86


def test_csv_shards(tmp_path):
    make_shards(tmp_path / "pq", 6000, 6)
    for f in sorted((tmp_path / "pq").iterdir()):
        (tmp_path / "csv").mkdir(exist_ok=True)
        pacsv.write_csv(pq.read_table(f), tmp_path / "csv" / f"{f.stem}.csv")
    kind = _kind(f"{tmp_path}/csv/part-*.csv")
    assert kind.shard_set().format == "csv" and kind.rows("train") == 4000
    assert kind.prep.columns[6].categories == ["a", "b", "c", "d"] or set(kind.prep.columns[6].categories) == set("abcd")


def test_bad_shards_are_named(tmp_path):
    make_shards(tmp_path / "ok", 3000, 3)
    missing = tmp_path / "ok" / "part-009.parquet"
    with pytest.raises(DataError, match=f"shard {missing}: no such file"):
        ShardSet(f"{tmp_path}/ok/part-000.parquet,{missing}")
    other = tmp_path / "ok" / "part-003.parquet"
    table = pq.read_table(tmp_path / "ok" / "part-000.parquet")
    pq.write_table(table.set_column(0, "x0", pa.array(table["x0"].to_numpy().astype(np.float32))), other)
    with pytest.raises(DataError, match=f"shard {other} has a different schema .*'x0' is float, not double"):
        ShardSet(str(tmp_path / "ok"))
    pq.write_table(table.drop_columns(["cat"]), other)
    with pytest.raises(DataError, match=f"shard {other} has a different schema .*lacks cat"):
        ShardSet(str(tmp_path / "ok"))
    with pytest.raises(DataError, match="matches no file"):
        ShardSet(f"{tmp_path}/nothing-*.parquet")


def test_a_url_whose_filesystem_package_is_missing_names_it():
    pytest.importorskip("fsspec")
    try:
        import s3fs  # noqa: F401
        pytest.skip("s3fs is installed")
    except ImportError:
        pass
    with pytest.raises(DataError, match=r"s3://.* needs the package s3fs \(pip install s3fs\)"):
        ShardSet("s3://bucket/table/")


def test_settings_that_need_rows_in_memory_are_refused(shards, tmp_path):
    with pytest.raises(ConfigError, match="train.hard_examples needs every training row in memory"):
        kiln.train(stream_config(shards, hard_examples={"fraction": 0.5}), out=tmp_path / "r", live=False)
    with pytest.raises(kiln.ConfigError, match="data.val_fraction: a streamed table holds out whole shards"):
        kiln.train({**stream_config(shards), "data": {**stream_config(shards)["data"], "val_fraction": 0.2}},
                   out=tmp_path / "r2", live=False)
    with pytest.raises(ConfigError, match="train.privacy samples every training row"):
        kiln.train(stream_config(shards, privacy={"epsilon": 3.0}), out=tmp_path / "r3", live=False)


# The child's own peak: VmHWM of /proc/self/status starts afresh at exec, while getrusage's ru_maxrss keeps the
# peak of the process it was forked from (pytest, gigabytes by the end of the suite) where fork is used.
MEMORY = """
import json, resource, sys
import kiln
run = kiln.train(json.loads(sys.argv[1]), out=sys.argv[2], live=False)
try:
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    rss_mb = int(hwm.split()[1]) / 1024
except OSError:  # no /proc (not Linux)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"rss_mb": rss_mb, "accuracy": run.metrics["test"]["accuracy"]}))
"""


def _peak_memory(folder: Path, out: Path, **train) -> dict:
    cfg = stream_config(folder, epochs=1, batch_size=1024, eval_batch_size=8192, log_every=200, **train)
    cfg["data"]["shuffle_rows"] = 65_536
    proc = subprocess.run([sys.executable, "-c", MEMORY, json.dumps(cfg), str(out)], capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_streamed_training_peak_memory_small(tmp_path):
    make_shards(tmp_path / "shards", 200_000, 20)
    result = _peak_memory(tmp_path / "shards", tmp_path / "run")
    assert result["accuracy"] > 0.86
    assert result["rss_mb"] < 1024, result


@pytest.mark.slow
def test_two_million_rows_in_20_parquet_shards_train_under_1_gb(tmp_path):
    make_shards(tmp_path / "shards", 2_000_000, 20)
    result = _peak_memory(tmp_path / "shards", tmp_path / "run")
    assert result["accuracy"] > 0.88
    assert result["rss_mb"] < 1024, result


# ---- text streamed from files ------------------------------------------------------------------------------


def text_shards(folder: Path, files: int = 6, chars: int = 4000) -> Path:
    from test_text import CORPUS

    folder.mkdir(parents=True, exist_ok=True)
    text = (CORPUS * (files * chars // len(CORPUS) + 1))
    for i in range(files):
        (folder / f"part-{i:02d}.txt").write_text(text[i * chars:(i + 1) * chars])
    return folder


def text_config(path, **train) -> dict:
    return {"name": "lm_stream", "seed": 0,
            "data": {"dataset": "text_stream", "path": str(path), "context": 16, "shuffle_windows": 100},
            "model": {"blocks": [{"type": "token_embedding", "width": 16},
                                 {"type": "positional_encoding", "kind": "learned"},
                                 {"type": "transformer_decoder", "layers": 1, "heads": 2, "bias": False},
                                 {"type": "lm_head"}]},
            "train": {"steps": 120, "batch_size": 8, "eval_every": 40, "eval_batches": 2, "log_every": 20,
                      "threads": 1, "optimizer": {"name": "adamw", "lr": 0.01}, **train}}


def test_streamed_text_trains_over_several_passes_and_generates_after_reload(tmp_path):
    shards = text_shards(tmp_path / "text")
    run = kiln.train(text_config(shards, steps=160), out=tmp_path / "run", live=False)
    history = [r for r in run.dir.read_metrics() if r["kind"] == "eval"]
    assert history[-1]["val_loss"] < history[0]["val_loss"] - 0.5
    kind = run.kind
    assert kind.reader_rows() == 4 * (3999 // 16)  # 4 training files of 4000 characters, windows of 16 + 1
    assert 160 * 8 > kind.reader_rows()  # the steps wrap into a second pass
    again = kiln.Run.load(run.path)
    assert again.generate("First", 20, temperature=0.8, top_k=5, seed=3) == run.generate("First", 20, temperature=0.8,
                                                                                          top_k=5, seed=3)


def test_streamed_text_windows_resume_at_the_right_window(tmp_path):
    kind = open_kind(kiln.config.load_config(text_config(text_shards(tmp_path / "text"))).data, 0)

    def rows(epoch, start):
        return np.concatenate([x for x, _ in kind.stream_blocks(seed=0, epoch=epoch, start=start)])

    full = rows(0, 0)
    for start in (1, 99, 100, 250, len(full) - 1):
        assert np.array_equal(rows(0, start), full[start:]), start
    x, y = next(kind.stream_blocks(seed=0, epoch=0, start=0))
    assert np.array_equal(x[:, 1:], y[:, :-1])  # targets are the window shifted by one token


def test_a_streamed_text_run_killed_then_resumed_matches_uninterrupted(tmp_path):
    from test_resume import _assert_same_run, _kill_after_a_checkpoint

    config = tmp_path / "lm.yaml"
    config.write_text(yaml.safe_dump(text_config(text_shards(tmp_path / "text"), steps=160, checkpoint_every=20)))
    reference = kiln.train(config, out=tmp_path / "reference", live=False)
    step = _kill_after_a_checkpoint(config, tmp_path / "killed")
    assert 0 < step < 160
    resumed = kiln.train(config, out=tmp_path / "killed", resume=True, live=False)
    _assert_same_run(resumed, reference, "eval")


def test_streamed_text_refuses_a_bpe_it_cannot_fit(tmp_path):
    cfg = text_config(text_shards(tmp_path / "text"))
    cfg["data"]["tokenizer"] = "bpe"
    with pytest.raises(ConfigError, match="bpe is trained on the whole text"):
        kiln.train(cfg, out=tmp_path / "r", live=False)


def test_shards_read_through_an_fsspec_url(tmp_path):
    """fsspec's in-memory filesystem stands in for s3:// or gs://: the same path through PyFileSystem(FSSpecHandler)."""
    fsspec = pytest.importorskip("fsspec")
    make_shards(tmp_path / "local", 3000, 3)
    fs = fsspec.filesystem("memory")
    for f in sorted((tmp_path / "local").iterdir()):
        fs.pipe(f"/kiln-test/{f.name}", f.read_bytes())
    shards = ShardSet("memory://kiln-test/")
    assert [Path(s.path).name for s in shards.shards] == ["part-000.parquet", "part-001.parquet", "part-002.parquet"]
    assert sum(b.num_rows for b in shards.batches(1)) == 1000
    fs.pipe("/kiln-test/part-003.parquet", b"not parquet")
    with pytest.raises(DataError, match="shard /kiln-test/part-003.parquet is not a readable parquet file"):
        ShardSet("memory://kiln-test/")
    fs.rm("/kiln-test", recursive=True)


def test_numeric_embedding_auto_follows_the_streamed_training_rows(shards, tmp_path):
    """tabular_encoder.numeric_embedding: auto counts the training shards' rows, as an in-memory table its rows."""
    assert _kind(shards).auto_fields() == {"tabular_encoder": {"numeric_embedding": "linear"}}  # 36,000 rows
    small = tmp_path / "small"
    small.mkdir()
    make_shards(small, 4_000, 4)  # 2 training shards of 1,000 rows
    assert _kind(small).auto_fields() == {"tabular_encoder": {"numeric_embedding": "none"}}
