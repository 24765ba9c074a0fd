"""The schema of a kiln config file, YAML loading, ``--set`` overrides, and errors that name the field.

The file's sections are put together here from where each is declared: every block's fields in its
module (:mod:`kiln.nn.blocks`), every kind of data's ``data`` fields in its module (:mod:`kiln.data`), the
training settings below. Each default is declared once, there. A resolved config (``Config.to_yaml``)
trains again as it is.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, ValidationError,
                      field_validator, model_validator)

import kiln.data  # noqa: F401  (fills the kinds-of-data registry the data section is made from)
import kiln.nn.blocks  # noqa: F401  (fills the block registry the model section is made from)
import kiln.training.muon  # noqa: F401  (optimizer: muon)
import kiln.training.optim  # noqa: F401  (fills the optimizer and schedule registries)
from kiln.errors import ConfigError
from kiln.nn.base import BlockSpec
from kiln.registry import BLOCKS, KINDS, OPTIMIZERS, SCHEDULES, did_you_mean
from kiln.schema import Pair, StrictModel
from kiln.training.ema import EmaConfig
from kiln.training.fairness import FairnessConfig
from kiln.training.metrics import MONITORS
from kiln.training.privacy import PrivacyConfig

BlockConfig = Annotated[Union[tuple(cls for _, cls in BLOCKS.items())], Field(discriminator="type")]  # noqa: UP007
# Each kind of data declares its own fields (its ``Config``); ``dataset`` says which.
DataConfig = Annotated[Union[tuple(kind.Config for _, kind in KINDS.items())],  # noqa: UP007
                       Field(discriminator="dataset")]
DEFAULT_DATASET = "mnist"
MAX_CONFIG_BYTES = 2**20  # a config file is a few kilobytes; YAML parsing costs about 5 s per 10 MB here


def _registered(registry, value: str) -> str:
    if value not in registry:
        raise ValueError(f"unknown {registry.kind} {value!r}{did_you_mean(value, registry.names())}; "
                         f"known: {', '.join(registry.names())}")
    return value


class ModelConfig(StrictModel):
    blocks: list[BlockConfig] = Field(min_length=1)


class OptimizerConfig(StrictModel):
    name: str = "adam"
    lr: Annotated[float, Field(gt=0.0, le=10.0)] | Literal["auto"] = 1e-3  # auto: kiln lr-find's suggestion
    weight_decay: NonNegativeFloat = 0.0  # decoupled for adamw, L2-in-gradient for adam and sgd
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)  # sgd, muon (its matrices; 0.95 in nanoGPT speedruns)
    nesterov: bool = False  # sgd only
    betas: Pair[float] = (0.9, 0.999)  # adam, adamw
    lr_scale: dict[int | str, PositiveFloat] = {}  # block (index, range "0-3" or type) -> factor of lr

    @field_validator("name")
    @classmethod
    def _known_optimizer(cls, v: str) -> str:
        return _registered(OPTIMIZERS, v)

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("each beta must be in [0, 1)")
        return v


class ScheduleConfig(StrictModel):
    name: str = "constant"  # constant | cosine | onecycle
    warmup: float = Field(default=0.0, ge=0.0, le=1.0)  # linear warm-up, a fraction of all steps (onecycle: 0.25)
    final_lr_fraction: float = Field(default=0.0, ge=0.0, le=1.0)  # cosine/onecycle end, relative to lr

    @field_validator("name")
    @classmethod
    def _known_schedule(cls, v: str) -> str:
        return _registered(SCHEDULES, v)


class EarlyStoppingConfig(StrictModel):
    monitor: Literal[MONITORS] = "val_loss"
    patience: PositiveInt = 3  # epochs without improvement before stopping
    min_delta: NonNegativeFloat = 0.0  # smallest change that counts as an improvement
    restore_best: bool = True  # end with the weights of the best epoch


class HardExamplesConfig(StrictModel):
    """From epoch `from_epoch` on, each epoch trains only on a `fraction` of the training samples: those
    with the highest loss when training last saw them (`select: hardest`), or a random draw (`random`)."""

    fraction: float = Field(gt=0.0, le=1.0)
    from_epoch: int = Field(default=2, ge=2)  # epoch 1 always sees every sample once
    select: Literal["hardest", "random"] = "hardest"


class CostsConfig(StrictModel):
    """What each wrong decision of a binary classifier costs, in any one unit (money, minutes of review)."""

    false_positive: NonNegativeFloat  # a negative row predicted positive (e.g. a needless fraud review)
    false_negative: NonNegativeFloat  # a positive row predicted negative (e.g. a missed fraud)

    @model_validator(mode="after")
    def _some_cost(self) -> CostsConfig:
        if not self.false_positive and not self.false_negative:
            raise ValueError("at least one of false_positive and false_negative must cost more than 0")
        return self


class TrainConfig(StrictModel):
    epochs: PositiveInt = 1
    batch_size: PositiveInt = 64
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)
    class_weights: Literal["auto"] | list[PositiveFloat] | None = None  # auto: inverse class frequency in train
    threshold_metric: Literal["f1", "accuracy", "balanced_accuracy", "cost"] | None = None  # binary: pick the
    # decision threshold that maximises this metric on the validation split (cost: minimises train.costs);
    # default 0.5
    costs: CostsConfig | None = None  # binary, with threshold_metric: cost
    l1: NonNegativeFloat = 0.0  # penalty on the sum of absolute weights
    l2: NonNegativeFloat = 0.0  # penalty on the sum of squared weights (added to the loss)
    grad_clip: PositiveFloat | None = None  # largest global gradient norm
    max_nonfinite_steps: NonNegativeInt = 0  # steps with a NaN or infinite loss skipped before training stops
    early_stopping: EarlyStoppingConfig | None = None
    init_from: str | None = None  # a run directory or .safetensors file: start from its weights (by name and shape)
    init_exclude: list[int | str] = []  # with init_from: blocks that start new anyway (a head whose classes differ)
    freeze: list[int | str] = []  # blocks (index, range "0-3" or type) whose weights stay as they start
    hard_examples: HardExamplesConfig | None = None  # later epochs on the samples that are still hard
    fairness: FairnessConfig | None = None  # e.g. {sensitive: foreign, method: reweigh} (kiln.training.fairness)
    privacy: PrivacyConfig | None = None  # train with differential privacy (DP-SGD; kiln.training.privacy)
    ema: EmaConfig | None = None  # e.g. {decay: 0.99}: evaluate and keep an average of the weights (kiln.training.ema)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    fuse: Literal["auto", "on", "off"] = "auto"  # faster kernels for block patterns (kiln.nn.fuse); auto: on CPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    parallel: Literal["auto", "ddp", "fsdp", "none"] = "auto"  # several processes (kiln train --nproc N): auto is
    # ddp; fsdp shards parameters, gradients and optimizer state per block (kiln.training.distributed)
    threads: Literal["auto"] | PositiveInt = "auto"  # CPU threads; auto: the CPUs this process may use and
    # that other processes leave free at the start (kiln.training.threads)
    eval_batch_size: PositiveInt = 1024
    log_every: PositiveInt = 50  # steps between progress updates (each one waits for the device)
    checkpoint_every: PositiveInt = 200  # steps between crash-safe checkpoints within an epoch
    # Text data trains for a number of steps on random batches instead of epochs.
    steps: PositiveInt = 2000  # text: optimisation steps
    eval_every: PositiveInt = 250  # text: steps between held-out evaluations (also at the first and last step)
    eval_batches: PositiveInt = 20  # text: random batches per split in each of those evaluations

    @model_validator(mode="after")
    def _costs_with_cost_threshold(self) -> TrainConfig:
        if self.threshold_metric == "cost" and self.costs is None:
            raise ValueError("threshold_metric cost needs train.costs: {false_positive: 1, false_negative: 5} "
                             "(what each wrong decision costs)")
        if self.costs is not None and self.threshold_metric != "cost":
            raise ValueError("train.costs is used by threshold_metric: cost; set it, or remove costs")
        return self

    @field_validator("device")
    @classmethod
    def _device_form(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, not {v!r}")


class Config(StrictModel):
    name: str = Field(default="run", pattern=r"^[A-Za-z0-9_.-]+$", max_length=200)
    seed: int = Field(default=0, ge=0, lt=2**32)
    data: DataConfig = KINDS.get(DEFAULT_DATASET).Config()
    model: ModelConfig
    train: TrainConfig = TrainConfig()

    @model_validator(mode="before")
    @classmethod
    def _default_dataset(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and isinstance(raw.get("data"), dict) and "dataset" not in raw["data"]:
            return {**raw, "data": {"dataset": DEFAULT_DATASET, **raw["data"]}}
        return raw

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def blocks(self) -> list[BlockSpec]:
        return list(self.model.blocks)


# ---- loading -----------------------------------------------------------------------------------


def load_config(source: str | os.PathLike | dict | Config,
                overrides: dict[str, Any] | list[str] | None = None) -> Config:
    """A Config from a YAML path, a dict or a Config, with dotted-key overrides applied first."""
    if isinstance(source, Config):
        raw, where = source.to_dict(), "config"
    elif isinstance(source, dict):
        raw, where = source, "config"
    else:
        raw, where = read_yaml(Path(source)), str(source)
        raw.setdefault("name", Path(source).stem)
    raw = apply_overrides(raw, overrides or {})
    return validate(raw, where)


class ConfigLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser where PyYAML has it
    """Safe YAML (no Python objects) that refuses a key given twice in one mapping, and reads numbers the way
    YAML 1.2 and people write them: ``1e-3`` is a float (PyYAML's YAML 1.1 rules read it as a string)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice in this mapping",
                                                        key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep)


ConfigLoader.add_implicit_resolver(  # checked after YAML 1.1's own int and float forms
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"), list("-+.0123456789"))


def parse_yaml(text: str, where: str) -> Any:
    """YAML text to plain values with :class:`ConfigLoader`; a ConfigError naming the place when it is not YAML."""
    try:
        return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 (a safe loader: plain types only)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        place = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark else where
        raise ConfigError(f"{place}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply to be a config (sections go a few levels deep)") from None


def read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        hint = (f" (to continue that run: kiln train {path / 'config.yaml'} --out {path} --resume)"
                if (path / "config.yaml").is_file() else "")
        raise ConfigError(f"{path} is a directory, not a config file{hint}")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path} is {size / 2**20:.1f} MiB; a config is a few kilobytes (at most "
                          f"{MAX_CONFIG_BYTES // 2**20} MiB): data belongs in the data files it names")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a UTF-8 text file") from None
    raw = parse_yaml(text, str(path))
    if raw is None:
        raise ConfigError(f"{path} is empty; a config needs at least a model section")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (data, model, train), "
                          f"not {type(raw).__name__}")
    return raw


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["train.epochs=3", ...]`` to ``{"train.epochs": 3}``; values are read as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. train.epochs=3")
        try:
            parsed = parse_yaml(value, f"--set {key.strip()}")
        except ConfigError:
            parsed = value
        # YAML 1.1 reads yes/no/on/off as booleans; only true/false mean a boolean on the command line.
        if isinstance(parsed, bool) and value.strip().lower() not in ("true", "false"):
            parsed = value
        out[key.strip()] = parsed
    return out


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any] | list[str]) -> dict[str, Any]:
    if isinstance(overrides, list):
        overrides = parse_set(overrides)
    try:
        raw = copy.deepcopy(raw)  # the caller's dict stays as it is; shared (YAML alias) values stay shared
    except RecursionError:
        raise ConfigError("the config is nested too deeply (sections go a few levels deep)") from None
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node: Any = raw
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            path = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {dotted}: {path} is not an index of a list of {len(node)} items")
                key: Any = int(part)
            elif isinstance(node, dict):
                key = part
            else:
                raise ConfigError(f"--set {dotted}: {'.'.join(parts[:depth])} is a value, not a section")
            if last:
                node[key] = value
            else:
                if isinstance(node, dict) and node.get(key) is None:
                    node[key] = {}
                node = node[key]
    return raw


def validate(raw: dict[str, Any], where: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_errors(e, where)) from None


_TYPE_TAGS = {"int", "float", "str", "bool", "none", "list", "dict", "tuple"}


def _is_member_tag(item: object) -> bool:
    """Names pydantic puts in a location for a union member or a constrained type ("constrained-int")."""
    return isinstance(item, str) and ("[" in item or item.startswith(("function-", "constrained-"))
                                      or item in _TYPE_TAGS)


def _split_loc(loc: tuple) -> tuple[str, bool]:
    """A dotted path a user recognises, and whether the error came from one member of a union."""
    parts: list[str] = []
    for i, item in enumerate(loc):
        # Discriminated unions put their tag in the location: model.blocks.3.lstm.units, data.tabular.target.
        if isinstance(item, str) and i > 0 and (isinstance(loc[i - 1], int) and item in BLOCKS
                                                or loc[i - 1] == "data" and i == 1 and item in KINDS):
            continue
        if _is_member_tag(item):
            return ".".join(parts) or "(top level)", True
        parts.append(str(item))
    return ".".join(parts) or "(top level)", False


def _got(value: object) -> str:
    if isinstance(value, dict | list):
        return f" (got a {type(value).__name__})"
    shown = repr(value)
    return f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"


def format_errors(error: ValidationError, where: str) -> str:
    lines: list[str] = []
    union_msgs: dict[str, list[str]] = {}  # one line per field for values no member of a union accepts
    union_input: dict[str, object] = {}
    for err in error.errors(include_url=False):
        path, from_union = _split_loc(err["loc"])
        ctx = err.get("ctx") or {}
        if err["type"] == "unknown_key":
            path = f"{path}.{ctx['key']}" if path != "(top level)" else ctx["key"]
            msg = f"unknown key; {ctx['hint']}allowed keys: {ctx['allowed']}"
        elif err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            field, what, registry = ("dataset", "dataset", KINDS) if path == "data" else ("type", "block type", BLOCKS)
            path += f".{field}"
            known = ", ".join(registry.names())
            tag = str(ctx.get("tag"))
            msg = (f"unknown {what} {tag!r}{did_you_mean(tag, registry.names())}; known: {known}"
                   if err["type"] == "union_tag_invalid" else f"every block needs a type; known: {known}")
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif err["type"] == "value_error":
            msg = err["msg"].removeprefix("Value error, ")
        else:
            msg = err["msg"]
            if from_union:
                union_msgs.setdefault(path, []).append(msg[0].lower() + msg[1:])
                union_input.setdefault(path, err.get("input"))
                continue
            if "input" in err:
                msg += _got(err["input"])
        lines.append(f"{path}: {msg}")
    for path, msgs in union_msgs.items():
        lines.append(f"{path}: {' or '.join(dict.fromkeys(msgs))}{_got(union_input[path])}")
    head = "invalid config" + ("" if where == "config" else f" {where}")
    if len(lines) > 1:
        head += f" ({len(lines)} problems)"
    return head + ":\n  " + "\n  ".join(lines)
