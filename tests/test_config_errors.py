"""Malformed configs: each is a small mutation of examples/mnist_seed.yaml and must fail with a
ConfigError whose message names the offending field by its dotted path (and, for misspellings,
suggests the nearest name). Shape errors come from building the model; file errors from loading."""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from kiln.config import Config, apply_overrides, load_config, parse_set
from kiln.errors import ConfigError
from kiln.nn.base import ShapeError
from kiln.summary import model_of

SEED_PATH = Path(__file__).resolve().parents[1] / "examples" / "mnist_seed.yaml"
SEED: dict[str, Any] = yaml.safe_load(SEED_PATH.read_text(encoding="utf-8"))
SEED_PARAMS = 71_268  # DESIGN.md: the seed_hybrid model

Mutation = Callable[[dict[str, Any]], dict[str, Any]]


def seed() -> dict[str, Any]:
    return copy.deepcopy(SEED)


def setting(**dotted: Any) -> Mutation:
    """A mutation that sets dotted paths, written with '__' for '.' (train__epochs=0)."""
    return lambda raw: apply_overrides(raw, {k.replace("__", "."): v for k, v in dotted.items()})


def edit(fn: Callable[[dict[str, Any]], Any]) -> Mutation:
    """A mutation by a direct edit of the dict."""

    def mutate(raw: dict[str, Any]) -> dict[str, Any]:
        fn(raw)
        return raw

    return mutate


def rename(section: list[str | int], old: str, new: str) -> Mutation:
    def fn(raw: dict[str, Any]) -> None:
        node: Any = raw
        for part in section:
            node = node[part]
        node[new] = node.pop(old)

    return edit(fn)


def blocks(*specs: dict[str, Any]) -> Mutation:
    return edit(lambda raw: raw["model"].__setitem__("blocks", [dict(s) for s in specs]))


def assert_clear(message: str) -> None:
    """One user-facing message: no traceback, no pydantic internals or documentation links."""
    assert "Traceback" not in message
    assert 'File "' not in message
    assert "pydantic" not in message.lower()
    assert "errors.pydantic.dev" not in message


def names_field(message: str, path: str) -> bool:
    """The message has a line ``<path>: ...`` — the path itself, not a longer path that starts with it."""
    return re.search(rf"(^|\s){re.escape(path)}: ", message, flags=re.MULTILINE) is not None


# ---------------------------------------------------------------- schema errors (load_config)

# (mutation, dotted path the message must name, fragments the message must contain)
SCHEMA_CASES = [
    # misspelt keys, each with the nearest allowed name
    pytest.param(rename([], "train", "trian"), "trian", ["unknown key", "did you mean 'train'"],
                 id="toplevel-key-typo"),
    pytest.param(edit(lambda r: r.__setitem__("sed", 1)), "sed", ["did you mean 'seed'"], id="toplevel-extra-key"),
    pytest.param(rename(["train"], "epochs", "epoch"), "train.epoch", ["did you mean 'epochs'"], id="train-key-typo"),
    pytest.param(rename(["data"], "val_fraction", "val_frac"), "data.val_frac", ["did you mean 'val_fraction'"],
                 id="data-key-typo"),
    pytest.param(setting(train__optimizer__lrr=0.01), "train.optimizer.lrr", ["did you mean 'lr'"],
                 id="optimizer-key-typo"),
    pytest.param(setting(train__early_stopping={"patince": 2}), "train.early_stopping.patince",
                 ["did you mean 'patience'"], id="early-stopping-key-typo"),
    pytest.param(rename(["model", "blocks", 4], "units", "unit"), "model.blocks.4.unit",
                 ["unknown key", "did you mean 'units'", "allowed keys"], id="block-field-typo"),
    pytest.param(setting(model__blocks__0__filter=32), "model.blocks.0.filter", ["did you mean 'filters'"],
                 id="conv-field-typo"),
    # block types
    pytest.param(setting(model__blocks__4__type="lstn"), "model.blocks.4.type",
                 ["unknown block type 'lstn'", "did you mean 'lstm'"], id="block-type-typo"),
    pytest.param(setting(model__blocks__5__type="transformer"), "model.blocks.5.type",
                 ["did you mean 'transformer_encoder'"], id="block-type-short"),
    pytest.param(edit(lambda r: r["model"]["blocks"][3].pop("type")), "model.blocks.3.type",
                 ["every block needs a type", "dense"], id="block-without-type"),
    pytest.param(setting(model__blocks__0="conv2d"), "model.blocks.0", ["dictionary", "'conv2d'"],
                 id="block-not-a-mapping"),
    # wrong types
    pytest.param(setting(model__blocks__4__units="fifty"), "model.blocks.4.units", ["integer", "'fifty'"],
                 id="string-for-int-block"),
    pytest.param(setting(train__epochs="three"), "train.epochs", ["integer", "'three'"], id="string-for-int-train"),
    pytest.param(setting(train__optimizer__lr=[0.001]), "train.optimizer.lr", ["number"], id="list-for-float"),
    pytest.param(setting(data__download="maybe"), "data.download", ["boolean", "'maybe'"], id="string-for-bool"),
    pytest.param(setting(train=3), "train", ["dictionary", "(got 3)"], id="section-not-a-mapping"),
    pytest.param(setting(model__blocks="conv2d"), "model.blocks", ["list"], id="blocks-not-a-list"),
    # zero and negative values
    pytest.param(setting(train__optimizer__lr=-0.001), "train.optimizer.lr", ["greater than 0", "-0.001"],
                 id="negative-lr"),
    pytest.param(setting(train__optimizer__lr=0), "train.optimizer.lr", ["greater than 0"], id="zero-lr"),
    pytest.param(setting(model__blocks__4__units=0), "model.blocks.4.units", ["greater than 0"], id="zero-units"),
    pytest.param(setting(train__batch_size=-64), "train.batch_size", ["greater than 0", "-64"], id="negative-batch"),
    pytest.param(setting(train__epochs=0), "train.epochs", ["greater than 0"], id="zero-epochs"),
    pytest.param(setting(train__early_stopping__patience=0), "train.early_stopping.patience", ["greater than 0"],
                 id="zero-patience"),
    pytest.param(setting(model__blocks__7__classes=0), "model.blocks.7.classes", ["greater than 0"],
                 id="zero-classes"),
    # out of range
    pytest.param(setting(model__blocks__5__dropout=1.5), "model.blocks.5.dropout", ["less than 1", "1.5"],
                 id="dropout-1.5"),
    pytest.param(edit(lambda r: r["model"]["blocks"].insert(4, {"type": "dropout", "rate": 1.5})),
                 "model.blocks.4.rate", ["less than 1", "1.5"], id="dropout-block-rate-1.5"),
    pytest.param(setting(data__val_fraction=1.0), "data.val_fraction", ["less than 1", "1.0"], id="val-fraction-1"),
    pytest.param(setting(data__val_fraction=-0.1), "data.val_fraction", ["greater than or equal to 0"],
                 id="val-fraction-negative"),
    pytest.param(setting(train__label_smoothing=1.0), "train.label_smoothing", ["less than 1"],
                 id="label-smoothing-1"),
    pytest.param(setting(train__optimizer__betas=[0.9, 1.0]), "train.optimizer.betas", ["[0, 1)"],
                 id="beta-1"),
    pytest.param(setting(train__hard_examples={"fraction": 0}), "train.hard_examples.fraction",
                 ["greater than 0"], id="hard-examples-fraction-0"),
    pytest.param(setting(train__hard_examples={"fraction": 0.5, "from_epoch": 1}), "train.hard_examples.from_epoch",
                 ["greater than or equal to 2"], id="hard-examples-from-epoch-1"),
    pytest.param(setting(train__hard_examples={"fraction": 0.5, "select": "easiest"}), "train.hard_examples.select",
                 ["'easiest'", "'hardest'", "'random'"], id="hard-examples-select"),
    # numbers that make no sense (the hardening issue's corpus)
    pytest.param(setting(seed=2**70), "seed", ["less than 4294967296"], id="seed-2**70"),
    pytest.param(setting(train__optimizer__lr=float("inf")), "train.optimizer.lr", ["finite number"], id="lr-inf"),
    pytest.param(setting(train__optimizer__lr=1e30), "train.optimizer.lr", ["less than or equal to 10"],
                 id="lr-1e30"),
    pytest.param(setting(model__blocks__0__filters=True), "model.blocks.0.filters", ["valid integer", "True"],
                 id="filters-true"),
    pytest.param(setting(model__blocks__3__units=64.0), "model.blocks.3.units", ["valid integer"],
                 id="units-float"),
    pytest.param(setting(model__blocks__3__units="64"), "model.blocks.3.units", ["valid integer", "'64'"],
                 id="units-string"),
    pytest.param(setting(data__augment__shift=1e30), "data.augment.shift", ["less than or equal to 1"],
                 id="augment-shift-1e30"),
    pytest.param(setting(data__augment__rotate=float("nan")), "data.augment.rotate", ["finite number"],
                 id="augment-rotate-nan"),
    pytest.param(setting(train__schedule__warmup=3), "train.schedule.warmup", ["less than or equal to 1"],
                 id="warmup-3"),
    pytest.param(setting(data__target="y"), "data.target", ["unknown key", "allowed keys"],
                 id="a-field-of-another-kind"),
    # registry names and enumerations
    pytest.param(setting(train__optimizer__name="adamm"), "train.optimizer.name",
                 ["unknown optimizer 'adamm'", "did you mean 'adam'", "adamw", "sgd"], id="optimizer-typo"),
    pytest.param(setting(train__schedule__name="cosin"), "train.schedule.name",
                 ["unknown schedule 'cosin'", "did you mean 'cosine'", "onecycle"], id="schedule-typo"),
    pytest.param(setting(data__dataset="mnsit"), "data.dataset", ["did you mean 'mnist'"], id="dataset-typo"),
    pytest.param(setting(train__device="gpu"), "train.device", ["'gpu'", "cuda:N"], id="device-gpu"),
    pytest.param(setting(train__device="cuda:x"), "train.device", ["'cuda:x'"], id="device-bad-index"),
    pytest.param(setting(train__precision="fp8"), "train.precision", ["'fp8'", "'bf16'", "'fp32'"],
                 id="precision"),
    pytest.param(setting(train__early_stopping__monitor="val_acc"), "train.early_stopping.monitor",
                 ["'val_acc'", "'val_accuracy'"], id="monitor"),
    pytest.param(setting(model__blocks__3__activation="rellu"), "model.blocks.3.activation", ["'rellu'", "'relu'"],
                 id="activation"),
    pytest.param(setting(name="my run"), "name", ["'my run'"], id="name-with-space"),
    # structure
    pytest.param(setting(model__blocks=[]), "model.blocks", ["at least 1"], id="empty-blocks"),
    pytest.param(edit(lambda r: r.pop("model")), "model", ["required field is missing"], id="missing-model"),
    pytest.param(edit(lambda r: r["model"]["blocks"][0].pop("filters")), "model.blocks.0.filters",
                 ["required field is missing"], id="missing-block-field"),
]


@pytest.mark.parametrize(("mutate", "path", "fragments"), SCHEMA_CASES)
def test_schema_error_names_the_field(mutate: Mutation, path: str, fragments: list[str]) -> None:
    raw = mutate(seed())
    with pytest.raises(ConfigError) as info:
        load_config(raw)
    message = str(info.value)
    assert names_field(message, path), f"message does not name {path!r}:\n{message}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from:\n{message}"
    assert_clear(message)


def test_every_problem_is_listed_at_once() -> None:
    raw = setting(train__epochs=0, data__val_fraction=2, model__blocks__4__unit=3)(seed())
    with pytest.raises(ConfigError) as info:
        load_config(raw)
    message = str(info.value)
    assert "3 problems" in message
    for path in ("train.epochs", "data.val_fraction", "model.blocks.4.unit"):
        assert names_field(message, path), message


def test_unknown_key_lists_allowed_keys_even_without_a_close_match() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(setting(train__zzzzzz=1)(seed()))
    message = str(info.value)
    assert names_field(message, "train.zzzzzz")
    assert "did you mean" not in message
    assert "allowed keys:" in message and "epochs" in message and "batch_size" in message


# ---------------------------------------------------------------- impossible shapes (building the model)

CONV = {"type": "conv2d", "filters": 32, "kernel": 3, "activation": "relu"}
POOL = {"type": "maxpool2d", "size": 2}

# (mutation, the block the message must name, fragments); each config is valid for the schema alone
SHAPE_CASES = [
    pytest.param(setting(model__blocks__5__heads=3), "model.blocks.5 (transformer_encoder)",
                 ["transformer_encoder.heads", "width 50", "heads=3"], id="heads-do-not-divide-width"),
    pytest.param(edit(lambda r: r["model"]["blocks"].pop(6)), "model.blocks.6 (classifier)",
                 ["needs vector", "(13, 50)", "seq_pool"], id="classifier-after-sequence"),
    pytest.param(blocks(CONV, {"type": "flatten"}, {"type": "conv2d", "filters": 8}, {"type": "classifier"}),
                 "model.blocks.2 (conv2d)", ["needs image", "(21632,)", "flatten"], id="conv-after-flatten"),
    pytest.param(setting(model__blocks__0__kernel=29), "model.blocks.0 (conv2d)",
                 ["(1, 28, 28)", "to nothing", "smaller kernel"], id="conv-kernel-larger-than-image"),
    pytest.param(setting(model__blocks__1__size=27), "model.blocks.1 (maxpool2d)",
                 ["(32, 26, 26)", "to nothing"], id="pool-larger-than-image"),
    pytest.param(edit(lambda r: r["model"]["blocks"].__setitem__(2, {"type": "seq_pool"})),
                 "model.blocks.2 (seq_pool)", ["needs sequence", "(32, 13, 13)"], id="seq-pool-on-image"),
    pytest.param(edit(lambda r: r["model"]["blocks"].__setitem__(2, {"type": "lstm", "units": 8})),
                 "model.blocks.2 (lstm)", ["needs sequence", "(32, 13, 13)", "rows_to_sequence"],
                 id="lstm-on-image"),
    pytest.param(setting(model__blocks__4__dropout=0.2), "model.blocks.4 (lstm)",
                 ["lstm.dropout", "layers >= 2"], id="lstm-dropout-one-layer"),
    pytest.param(setting(model__blocks__0__padding="same", model__blocks__0__stride=2), "model.blocks.0 (conv2d)",
                 ["padding: same", "stride 1"], id="same-padding-stride-2"),
    pytest.param(edit(lambda r: r["model"]["blocks"].insert(5, {"type": "positional_encoding", "max_steps": 5})),
                 "model.blocks.5 (positional_encoding)", ["max_steps=5", "13 steps"], id="positions-too-short"),
    pytest.param(setting(model__blocks__3__units=10**15), "model.blocks.3 (dense)",
                 ["parameters", "GiB of memory here", "make its sizes smaller"], id="dense-units-1e15"),
]


def test_a_block_field_the_data_decides_must_agree_with_it() -> None:
    """classifier classes: 1 on MNIST's ten classes once ended in an IndexError inside the loss."""
    with pytest.raises(ConfigError) as info:
        model_of(load_config(setting(model__blocks__7__classes=1)(seed())))
    assert str(info.value).startswith("model.blocks.7.classes: ") and "data gives 10" in str(info.value)
    assert model_of(load_config(setting(model__blocks__7__classes=10)(seed())))  # agreeing is fine


@pytest.mark.parametrize(("mutate", "block", "fragments"), SHAPE_CASES)
def test_impossible_model_names_the_block(mutate: Mutation, block: str, fragments: list[str]) -> None:
    cfg = load_config(mutate(seed()))  # the schema accepts it: only building can tell
    with pytest.raises(ConfigError) as info:
        model_of(cfg)
    message = str(info.value)
    assert message.startswith(f"{block}: "), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from:\n{message}"
    assert_clear(message)


def test_lstm_after_flatten_and_dense_explains_the_tutorial_mistake() -> None:
    """The tutorial's code: conv -> pool -> flatten -> dense -> LSTM. The LSTM gets a flat vector."""
    raw = blocks(CONV, POOL, {"type": "flatten"}, {"type": "dense", "units": 64, "activation": "relu"},
                 {"type": "lstm", "units": 50}, {"type": "seq_pool"}, {"type": "classifier", "classes": 10})(seed())
    cfg = load_config(raw)
    with pytest.raises(ShapeError) as info:
        model_of(cfg)
    message = str(info.value)
    assert isinstance(info.value, ConfigError)
    assert "model.blocks.4 (lstm)" in message  # which block
    assert "(64,)" in message  # the shape it got
    assert "vector" in message
    assert "needs sequence (steps, features)" in message  # what it expected
    assert "rows_to_sequence" in message  # how to fix it
    assert "instead of `flatten`" in message
    assert_clear(message)


# ---------------------------------------------------------------- files

@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        pytest.param("- conv2d\n- dense\n", "top level must be a mapping of sections (data, model, train), not list",
                     id="list"),
        pytest.param("just a string\n", "top level must be a mapping of sections (data, model, train), not str",
                     id="scalar"),
        pytest.param("", "is empty; a config needs at least a model section", id="empty-file"),
    ],
)
def test_yaml_that_is_not_a_mapping(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert fragment in message
    assert_clear(message)


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  blocks: [\n  - {type: dense\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert "not valid YAML" in message
    assert f"{path}:3:3" in message
    assert_clear(message)


def test_a_key_given_twice_is_refused_with_its_name_and_line(tmp_path: Path) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text(SEED_PATH.read_text() + "seed: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "the key 'seed' is given twice" in str(info.value) and f"{path}:" in str(info.value)


@pytest.mark.parametrize("text", ["a: " + "[" * 50_000 + "]" * 50_000, "a:\n" + "".join(
    "  " * i + "b:\n" for i in range(1, 3000))], ids=["lists-50000-deep", "mappings-3000-deep"])
def test_yaml_nested_absurdly_deep_is_an_error_not_a_crash(tmp_path: Path, text: str) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="nest"):
        load_config(path)
    assert time.perf_counter() - start < 10


def test_alias_bombs_and_big_files_end_within_seconds(tmp_path: Path) -> None:
    """A 1 MB string referred to 1,000 times (a YAML alias) once took minutes; a 10 MB config 46 s."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(SEED_PATH.read_text() + "x: &big " + "a" * 500_000 + "\ny: [" + ", ".join(["*big"] * 1000) + "]\n")
    big = tmp_path / "big.yaml"
    big.write_text(SEED_PATH.read_text() + "".join(f"k{i}: [1, 2, 3, 4, 5, 6, 7, 8]\n" for i in range(300_000)))
    assert big.stat().st_size > 10_000_000
    for path, fragment in ((bomb, "x: unknown key"), (big, "a config is a few kilobytes")):
        start = time.perf_counter()
        with pytest.raises(ConfigError) as info:
            load_config(path, ["train.epochs=2"])
        assert time.perf_counter() - start < 10
        assert fragment in str(info.value) and len(str(info.value)) < 2000


def test_config_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(ConfigError, match="not a UTF-8 text file"):
        load_config(path)


def test_config_file_that_does_not_exist(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"config file {path} does not exist"


def test_schema_error_from_a_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(rename(["model", "blocks", 4], "units", "unit")(seed())))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"invalid config {path}:")
    assert names_field(message, "model.blocks.4.unit") and "did you mean 'units'" in message


# ---------------------------------------------------------------- --set overrides

@pytest.mark.parametrize(
    ("item", "fragments"),
    [
        pytest.param("model.blocks.8.units=3", ["--set model.blocks.8.units", "model.blocks.8",
                                                "not an index of a list of 8 items"], id="index-out-of-range"),
        pytest.param("model.blocks.-1.units=3", ["model.blocks.-1", "not an index"], id="negative-index"),
        pytest.param("model.blocks.dense.units=3", ["model.blocks.dense", "not an index"], id="name-as-index"),
        pytest.param("train.epochs.max=3", ["--set train.epochs.max", "train.epochs is a value, not a section"],
                     id="through-a-value"),
    ],
)
def test_set_on_a_path_that_cannot_exist(item: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(seed(), [item])
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert_clear(message)


@pytest.mark.parametrize("item", ["train.epochs", "=3", " =3", ""])
def test_set_without_key_or_equals(item: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_set([item])
    message = str(info.value)
    assert f"--set {item!r}" in message
    assert "expected dotted.key=value" in message


def test_set_values_are_yaml_scalars() -> None:
    assert parse_set(["train.epochs=3", "train.device=cpu", "data.root=", "train.optimizer.lr=0.5",
                      "data.download=false", " seed = 7"]) == {
        "train.epochs": 3, "train.device": "cpu", "data.root": None, "train.optimizer.lr": 0.5,
        "data.download": False, "seed": 7,
    }
    # YAML 1.1 reads 1e-4 (no dot) as a string; kiln's loader reads it as the number, as YAML 1.2 does.
    assert parse_set(["train.optimizer.lr=1e-4"]) == {"train.optimizer.lr": 1e-4}
    assert load_config(seed(), ["train.optimizer.lr=1e-4"]).train.optimizer.lr == 1e-4


def test_set_with_a_bad_value_names_the_field() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(seed(), ["model.blocks.4.units=many"])
    assert names_field(str(info.value), "model.blocks.4.units")


# ---------------------------------------------------------------- the valid config

def test_seed_config_loads_builds_and_round_trips() -> None:
    cfg = load_config(SEED_PATH)
    assert cfg.name == "mnist_seed"
    assert [b.type for b in cfg.blocks] == ["conv2d", "maxpool2d", "rows_to_sequence", "dense", "lstm",
                                            "transformer_encoder", "seq_pool", "classifier"]
    model = model_of(cfg)
    assert sum(p.numel() for p in model.parameters()) == SEED_PARAMS
    assert model.output_shape == (10,)
    # A resolved config trains again as it is: it loads back to the same config.
    assert load_config(yaml.safe_load(cfg.to_yaml())) == cfg
    assert load_config(cfg) == cfg
    assert isinstance(load_config(seed()), Config)


def test_overrides_apply_and_leave_the_source_unchanged() -> None:
    raw = seed()
    cfg = load_config(raw, ["model.blocks.4.units=64", "train.epochs=3", "train.early_stopping.patience=2"])
    assert cfg.model.blocks[4].units == 64
    assert cfg.train.epochs == 3
    assert cfg.train.early_stopping is not None and cfg.train.early_stopping.patience == 2
    assert raw == SEED


def test_cli_prints_one_message_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kiln.cli import main

    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(setting(train__optimizer__name="adamm")(seed())))
    assert main(["summary", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"error: invalid config {path}:\n")
    assert "train.optimizer.name: unknown optimizer 'adamm' (did you mean 'adam'?)" in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 2  # the heading and the one problem
