"""A search space: which config keys a tuning study varies, over which values, and when.

A space file maps config keys, by the dotted path ``--set`` uses, to what each may take::

    train.optimizer.lr: {float: [1.0e-4, 1.0e-2], log: true}   # log scale; `step: 0.1` for a grid
    model.blocks.2.units: {int: [16, 256], log: true}          # `step: 16` for multiples
    train.schedule.name: {choice: [constant, cosine]}
    train.schedule.warmup: {float: [0.0, 0.2], when: {train.schedule.name: cosine}}

``when`` makes a key conditional: it is sampled only when each key it names (an earlier key of the space)
took the value given (or one of a list of values); otherwise the config keeps its own value. Keys are
sampled in the file's order. Every key is checked against the config before a trial runs: a key that the
config does not have is an error naming the nearest one that it has, and a range is checked by building the
config with each of its ends (each choice), so a value the key does not allow is an error naming the field.
"""

from __future__ import annotations

import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from kiln.config import Config, load_config, parse_yaml
from kiln.errors import ConfigError

KINDS = ("float", "int", "choice")
OPTIONS = {"float": ("log", "step", "when"), "int": ("log", "step", "when"), "choice": ("when",)}
PLAIN = (str, int, float, bool, type(None))  # what Optuna stores as a choice


@dataclass(frozen=True)
class Param:
    """One key of the space."""

    key: str  # dotted config path, also the parameter's name in the study
    kind: str  # float | int | choice
    low: Any = None
    high: Any = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()
    when: dict[str, tuple] = field(default_factory=dict)  # key -> values that key must have

    def describe(self) -> str:
        if self.kind == "choice":
            text = "one of " + ", ".join(map(repr, self.choices))
        else:
            text = f"{self.kind} in [{self.low}, {self.high}]" + (" (log)" if self.log else "") + (
                f" step {self.step}" if self.step is not None else "")
        if self.when:
            text += " when " + " and ".join(f"{k} in {list(v)}" for k, v in self.when.items())
        return text

    def to_dict(self) -> dict[str, Any]:
        spec: dict[str, Any] = ({"choice": list(self.choices)} if self.kind == "choice"
                                else {self.kind: [self.low, self.high]})
        if self.log:
            spec["log"] = True
        if self.step is not None:
            spec["step"] = self.step
        if self.when:
            spec["when"] = {k: list(v) for k, v in self.when.items()}
        return spec


@dataclass(frozen=True)
class Space:
    params: tuple[Param, ...]
    where: str = "space"

    def to_dict(self) -> dict[str, Any]:
        return {p.key: p.to_dict() for p in self.params}

    def sample(self, trial) -> dict[str, Any]:
        """The overrides of one trial: each key whose conditions hold, suggested by the Optuna ``trial``."""
        chosen: dict[str, Any] = {}
        for p in self.params:
            if any(k not in chosen or chosen[k] not in values for k, values in p.when.items()):
                continue
            if p.kind == "float":
                chosen[p.key] = trial.suggest_float(p.key, p.low, p.high, log=p.log, step=p.step)
            elif p.kind == "int":
                chosen[p.key] = trial.suggest_int(p.key, p.low, p.high, log=p.log, step=p.step or 1)
            else:
                chosen[p.key] = trial.suggest_categorical(p.key, list(p.choices))
        return chosen


def read_space(source: str | dict, where: str | None = None) -> Space:
    """A Space from a YAML file's path or a dict (the file's content), its form checked; not yet against a config."""
    if isinstance(source, dict):
        raw, where = source, where or "space"
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"search space file {path} does not exist")
        raw, where = parse_yaml(path.read_text(encoding="utf-8"), str(path)), str(path)
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}: a search space is a mapping of dotted config keys to ranges, e.g. "
                          "`train.optimizer.lr: {float: [1.0e-4, 1.0e-2], log: true}`")
    params: list[Param] = []
    for key, spec in raw.items():
        params.append(_param(str(key), spec, where, {p.key: p for p in params}))
    return Space(tuple(params), where)


def _param(key: str, spec: Any, where: str, earlier: dict[str, Param]) -> Param:
    at = f"{where}: {key}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{at}: expected a mapping such as {{float: [0.0, 1.0]}}, {{int: [1, 4]}} or "
                          f"{{choice: [a, b]}}, not {spec!r}")
    kinds = [k for k in spec if k in KINDS]
    if len(kinds) != 1:
        raise ConfigError(f"{at}: give exactly one of float, int or choice (got {', '.join(map(str, spec)) or 'none'})")
    kind = kinds[0]
    for option in spec:
        if option != kind and option not in OPTIONS[kind]:
            raise ConfigError(f"{at}: unknown option {option!r} for a {kind} range; allowed: "
                              f"{', '.join(OPTIONS[kind])}")
    when = _conditions(at, spec.get("when"), earlier)
    if kind == "choice":
        choices = spec["choice"]
        if not isinstance(choices, list) or len(choices) < 1:
            raise ConfigError(f"{at}: choice takes a list of values, e.g. {{choice: [32, 64, 128]}}")
        bad = [c for c in choices if not isinstance(c, PLAIN)]
        if bad:
            raise ConfigError(f"{at}: choices must be plain values (text, numbers, true/false, null), not {bad[0]!r}")
        if len(set(map(repr, choices))) != len(choices):
            raise ConfigError(f"{at}: a choice is listed twice")
        return Param(key, kind, choices=tuple(choices), when=when)
    ends = spec[kind]
    number = (int,) if kind == "int" else (int, float)
    if (not isinstance(ends, list) or len(ends) != 2
            or not all(isinstance(v, number) and not isinstance(v, bool) for v in ends)):
        example = "[1, 4]" if kind == "int" else "[1.0e-4, 1.0e-2]"
        raise ConfigError(f"{at}: {kind} takes [low, high] as two {'integers' if kind == 'int' else 'numbers'}, "
                          f"e.g. {{{kind}: {example}}}, not {ends!r}")
    low, high = (float(v) for v in ends) if kind == "float" else ends
    if kind == "float" and not all(math.isfinite(v) for v in (low, high)):
        raise ConfigError(f"{at}: the ends of a range must be finite numbers")
    if not low < high:
        raise ConfigError(f"{at}: low ({low}) must be below high ({high}); for one value, leave the key out of "
                          "the space and set it in the config")
    log, step = spec.get("log", False), spec.get("step")
    if not isinstance(log, bool):
        raise ConfigError(f"{at}: log is true or false, not {log!r}")
    if log and low <= 0:
        raise ConfigError(f"{at}: a log-scale range must be above 0 (low is {low})")
    if step is not None:
        if log:
            raise ConfigError(f"{at}: give log or step, not both (Optuna samples a log scale without steps)")
        if not isinstance(step, number) or isinstance(step, bool) or step <= 0:
            raise ConfigError(f"{at}: step must be a positive {'integer' if kind == 'int' else 'number'}, not {step!r}")
        step = float(step) if kind == "float" else step
    return Param(key, kind, low, high, log, step, when=when)


def _conditions(at: str, when: Any, earlier: dict[str, Param]) -> dict[str, tuple]:
    if when is None:
        return {}
    if not isinstance(when, dict) or not when:
        raise ConfigError(f"{at}: when takes a mapping of earlier keys to values, e.g. "
                          "`when: {train.schedule.name: cosine}` or `when: {model.blocks.1.type: [dense, mlp]}`")
    out: dict[str, tuple] = {}
    for key, values in when.items():
        if key not in earlier:
            hint = difflib.get_close_matches(str(key), list(earlier), n=1)
            raise ConfigError(f"{at}: when names {key!r}, which is not an earlier key of the space"
                              + (f" (did you mean {hint[0]!r}?)" if hint else "")
                              + "; a condition refers to a key sampled before it")
        values = tuple(values) if isinstance(values, list) else (values,)
        if earlier[key].kind == "choice":
            missing = [v for v in values if v not in earlier[key].choices]
            if missing:
                raise ConfigError(f"{at}: when {key}: {missing[0]!r} is not one of its choices "
                                  f"({', '.join(map(repr, earlier[key].choices))})")
        out[str(key)] = values
    return out


# ---- checking a space against a config ---------------------------------------------------------


def config_keys(cfg: Config) -> list[str]:
    """Every dotted path a config has: its sections, their fields, list items; the fields of a section that is
    unset (``train.early_stopping: null``) too, as setting one of them creates the section."""
    keys: list[str] = []

    def walk(value: Any, prefix: str, model: type[BaseModel] | None) -> None:
        if isinstance(value, BaseModel):
            for name in type(value).model_fields:
                sub = getattr(value, name)
                path = f"{prefix}.{name}" if prefix else name
                keys.append(path)
                walk(sub, path, _section_of(type(value), name) if sub is None else None)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                keys.append(f"{prefix}.{i}")
                walk(item, f"{prefix}.{i}", None)
        elif isinstance(value, dict):
            for k, item in value.items():
                keys.append(f"{prefix}.{k}")
                walk(item, f"{prefix}.{k}", None)
        elif value is None and model is not None:
            for name in model.model_fields:
                keys.append(f"{prefix}.{name}")
                walk(None, f"{prefix}.{name}", _section_of(model, name))

    walk(cfg, "", None)
    return keys


def _section_of(model: type[BaseModel], name: str) -> type[BaseModel] | None:
    """The config section class a field holds when it is set (``EarlyStoppingConfig | None`` -> the class)."""
    annotation = model.model_fields[name].annotation
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def check_space(space: Space, base: dict[str, Any]) -> None:
    """Every key exists in the config ``base`` (a resolved config as a dict), and the config is valid with each
    end of every range (each choice), the key's conditions holding; else a ConfigError naming the key."""
    keys = config_keys(load_config(base))
    known = set(keys)
    for p in space.params:
        if p.key not in known:
            near = difflib.get_close_matches(p.key, keys, n=1, cutoff=0.0)
            raise ConfigError(f"{space.where}: {p.key} is not a key of the config; the nearest one is {near[0]!r}"
                              if near else f"{space.where}: {p.key} is not a key of the config")
        given = {k: v[0] for k, v in p.when.items()}
        for value in p.choices if p.kind == "choice" else (p.low, p.high):
            try:
                load_config(base, {**given, p.key: value})
            except ConfigError as e:
                detail = str(e).split("\n", 1)[-1].strip()
                raise ConfigError(f"{space.where}: {p.key}: {value!r} is outside what the config allows "
                                  f"({p.describe()}): {detail}") from None
