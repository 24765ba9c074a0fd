"""The ``interactions`` kind of data: who interacted with what (and when, and how they rated it), for recommendation.

A CSV or Parquet file has a user column, an item column and optionally a rating and a timestamp (the column names
are settings). Users and items become codes 0..n-1 (ids sorted, numerically when every id is a number); the run
directory keeps both id maps, the items' titles and side features, and every user's interactions in time order
(``interactions.json``, ``history.safetensors``): what `kiln predict --user` and serving need to leave out items
a user has already seen.

Split, per user and in time order (ties keep the file's order): the last ``data.test_last`` interactions are the
test split, the ``data.val_last`` before them validation, the rest training. Every user keeps at least one
interaction for training: a user with one interaction trains only (counted in the report), a user with few holds
out fewer.

Two targets:

- ``implicit``: rank items. A training sample is one (user, item) interaction; ``augment`` adds
  ``data.negatives`` items drawn uniformly at random (seeded: the trainer's augmentation generator, saved in
  checkpoints) and the model scores them all; the loss is the cross-entropy of the true item among them (sampled
  softmax; its class is 0). Evaluation ranks ALL items for each held-out user, leaving out those the user
  interacted with before the held-out ones (training items; for test also validation items): Recall@10,
  NDCG@10 and hit rate@10 (task ``ranking``).
- ``rating``: predict the rating (regression on the standardised rating, MSE); RMSE in stars.

A stored sample is a row (user, item, position in the user's timeline); the model reads (user, item, item, ...):
a user code followed by the candidate items it scores.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, NonNegativeInt, PositiveInt, model_validator
from safetensors.torch import load_file, save

from kiln.data.kind import DataKind, DataSpec, find_data
from kiln.data.requests import objects
from kiln.data.splits import Splits
from kiln.data.table import Table, read_table
from kiln.data.user_inputs import UserInputs
from kiln.errors import DataError, KilnError, RunDirError
from kiln.fsutil import atomic_write_bytes, atomic_write_text
from kiln.nn.base import BlockSpec
from kiln.registry import KINDS
from kiln.rundir import RunDir

MAPS = "interactions.json"  # id maps, titles, feature names, rating scale
HISTORY = "history.safetensors"  # every user's items in time order
RECOMMENDERS = ("matrix_factorization", "two_tower")  # blocks that read (user, items...) and score each item
MAX_TOP = 1000


class InteractionsData(DataSpec):
    dataset: Literal["interactions"] = "interactions"
    path: str  # a CSV or Parquet file of interactions, relative to root, the current directory or $KILN_DATA
    user_column: str = "user"
    item_column: str = "item"
    rating_column: str | None = None  # needed for target: rating
    time_column: str | None = None  # numbers (e.g. Unix seconds) or ISO 8601 dates; default: the file's order
    target: Literal["implicit", "rating"] = "implicit"  # rank items, or predict ratings
    negatives: PositiveInt = 64  # implicit: random items scored against each true one in training
    test_last: PositiveInt = 5  # each user's last interactions held out for test
    val_last: NonNegativeInt = 5  # the interactions before those, held out for validation
    items_path: str | None = None  # a CSV of item attributes (e.g. MovieLens movies.csv), optional
    items_id_column: str | None = None  # the item id column in items_path (default: item_column)
    title_column: str | None = None  # in items_path: shown by `kiln predict --user` and serving
    features_column: str | None = None  # in items_path: each item's categories (e.g. genres), multi-hot side features
    features_separator: str = Field(default="|", min_length=1, max_length=8)

    @model_validator(mode="after")
    def _checks(self) -> InteractionsData:
        if self.val_fraction != DataSpec.model_fields["val_fraction"].default:  # a saved config holds the default
            raise ValueError("data.val_fraction does not apply to interactions: each user's last data.val_last "
                             "interactions are the validation split")
        if self.target == "rating" and self.rating_column is None:
            raise ValueError("data.target rating needs data.rating_column (the column of ratings)")
        if (self.title_column or self.features_column) and not self.items_path:
            raise ValueError("data.title_column and data.features_column are columns of data.items_path; set it")
        return self


def _sorted_ids(values: list[str]) -> list[str]:
    """Distinct ids, numerically sorted when all are integers (so 2 comes before 10), else as text."""
    distinct = set(values)
    try:
        return sorted(distinct, key=int)
    except ValueError:
        return sorted(distinct)


def _column(table: Table, name: str, setting: str) -> list[str | None]:
    if name not in table.columns:
        raise DataError(f"data.{setting}: {table.source} has no column {name!r}; its columns are "
                        f"{', '.join(table.columns)}")
    return table.columns[name]


def _numbers(table: Table, name: str, setting: str, dates: bool = False) -> np.ndarray:
    """A column as float64; with ``dates``, ISO 8601 dates and times count too (as Unix seconds)."""
    out = np.empty(len(table), dtype=np.float64)
    for i, v in enumerate(_column(table, name, setting)):
        try:
            out[i] = float(v) if v is not None else np.nan
        except ValueError:
            try:
                if not dates:
                    raise
                when = datetime.fromisoformat(v)
                out[i] = (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()
            except ValueError:
                raise DataError(f"data.{setting}: {table.source} {table.where[i]}: {v!r} in column {name!r} is not a "
                                "number" + (" or an ISO 8601 date" if dates else "")) from None
        if not np.isfinite(out[i]):
            raise DataError(f"data.{setting}: {table.source} {table.where[i]}: column {name!r} has no value")
    return out


def _ids(table: Table, name: str, setting: str) -> list[str]:
    values = _column(table, name, setting)
    for i, v in enumerate(values):
        if v is None:
            raise DataError(f"data.{setting}: {table.source} {table.where[i]}: column {name!r} has no value")
    return values  # type: ignore[return-value]


@KINDS.register("interactions")
class Interactions(DataKind):
    Config = InteractionsData
    description: ClassVar[str] = "recommendation"
    usage: ClassVar[str] = "use `kiln predict RUN --user ID --top 10`, or Run.recommend"
    run_files: ClassVar[tuple[str, ...]] = (MAPS, HISTORY)
    decodes: ClassVar[bool] = True  # an answer is a ranked list of items, computed per user (not one forward pass)
    answers: ClassVar[str] = "items"
    input_name: ClassVar[str] = "ids"
    class_names: ClassVar[list[str]] = []

    def __init__(self, cfg: InteractionsData, seed: int, run_path: Path | None = None) -> None:
        super().__init__(cfg, seed)
        self.cfg: InteractionsData = cfg
        self.counts: dict[str, int] = {}
        if run_path is not None:
            self._reopen(RunDir(run_path))
            return
        self._read()

    # ---- reading ---------------------------------------------------------------------------------

    def _read(self) -> None:
        """Read the file: id maps, each user's timeline, the split, ratings, item attributes."""
        cfg = self.cfg
        source = find_data(cfg.path, cfg.root, "an existing CSV or Parquet file of interactions")
        if not source.is_file():
            raise DataError(f"data.path {cfg.path!r}: {source} is not a file; give a CSV or Parquet file")
        table = read_table(source)
        self.source = source
        users = _ids(table, cfg.user_column, "user_column")
        items = _ids(table, cfg.item_column, "item_column")
        self.user_ids, self.item_ids = _sorted_ids(users), _sorted_ids(items)
        user_code = {u: k for k, u in enumerate(self.user_ids)}
        item_code = {v: k for k, v in enumerate(self.item_ids)}
        u = np.fromiter((user_code[x] for x in users), dtype=np.int64, count=len(users))
        i = np.fromiter((item_code[x] for x in items), dtype=np.int64, count=len(items))
        when = (_numbers(table, cfg.time_column, "time_column", dates=True) if cfg.time_column
                else np.arange(len(u), dtype=np.float64))
        rating = _numbers(table, cfg.rating_column, "rating_column") if cfg.rating_column else None
        order = np.lexsort((np.arange(len(u)), when, u))  # by user, then time, then the file's order
        self.u, self.i = u[order], i[order]
        self.rating = rating[order] if rating is not None else None
        self.ptr = np.concatenate([[0], np.cumsum(np.bincount(self.u, minlength=len(self.user_ids)))])
        self.position = np.arange(len(self.u)) - self.ptr[self.u]  # each row's place in its user's timeline
        self.role = self._roles()
        train = self.role == 0
        if self.rating is not None:
            self.rating_mean = float(self.rating[train].mean())
            self.rating_std = float(self.rating[train].std()) or 1.0
        else:
            self.rating_mean, self.rating_std = 0.0, 1.0
        self.titles, self.feature_names, self.features = self._item_attributes()
        self.digest = hashlib.sha256(source.read_bytes()).hexdigest()

    def _roles(self) -> np.ndarray:
        """0 train, 1 validation, 2 test for each row (time-ordered per user); counts what was left out."""
        cfg = self.cfg
        n = np.diff(self.ptr)[self.u]  # the row's user's interaction count
        n_test = np.minimum(cfg.test_last, np.maximum(n - 1, 0))
        n_val = np.minimum(cfg.val_last, n - 1 - n_test)
        from_end = n - self.position  # 1 for a user's last row
        role = np.where(from_end <= n_test, 2, np.where(from_end <= n_test + n_val, 1, 0))
        per_user = np.diff(self.ptr)
        full = cfg.test_last + cfg.val_last + 1
        self.counts = {"users": len(self.user_ids), "items": len(self.item_ids), "interactions": len(self.u),
                       "one_interaction_users": int((per_user == 1).sum()),
                       "short_users": int(((per_user > 1) & (per_user < full)).sum()),
                       "train": int((role == 0).sum()), "val": int((role == 1).sum()), "test": int((role == 2).sum())}
        if not self.counts["test"]:
            raise DataError(f"data.path: no user of {self.cfg.path} has two interactions, so nothing is left to "
                            "test on; a user's last interactions are held out only when an earlier one remains")
        return role

    def _item_attributes(self) -> tuple[list[str] | None, list[str], np.ndarray]:
        """Titles and multi-hot side features (items, features) from data.items_path, by item code."""
        cfg = self.cfg
        empty = np.zeros((len(self.item_ids), 0), dtype=np.float32)
        if not cfg.items_path:
            return None, [], empty
        path = find_data(cfg.items_path, cfg.root, "an existing CSV or Parquet file of item attributes")
        table = read_table(path)
        id_column = cfg.items_id_column or cfg.item_column
        ids = _ids(table, id_column, "items_id_column")
        row_of = {v: r for r, v in enumerate(ids)}
        rows = [row_of.get(v) for v in self.item_ids]
        titles = None
        if cfg.title_column:
            column = _column(table, cfg.title_column, "title_column")
            titles = [(column[r] or "") if r is not None else "" for r in rows]
        if not cfg.features_column:
            return titles, [], empty
        column = _column(table, cfg.features_column, "features_column")
        tags = [[t.strip() for t in (column[r] or "").split(cfg.features_separator) if t.strip()]
                if r is not None else [] for r in rows]
        names = sorted({t for item in tags for t in item})
        index = {t: k for k, t in enumerate(names)}
        features = np.zeros((len(self.item_ids), len(names)), dtype=np.float32)
        for k, item in enumerate(tags):
            features[k, [index[t] for t in item]] = 1.0
        return titles, names, features

    def _reopen(self, run_dir: RunDir) -> None:
        for name in self.run_files:
            if not (run_dir / name).is_file():
                raise RunDirError(f"{run_dir.path} has no {name}: it is not a finished recommendation run")
        try:
            saved = json.loads((run_dir / MAPS).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise RunDirError(f"{run_dir / MAPS} is not readable JSON: {e}") from None
        self.user_ids, self.item_ids, self.titles = saved["users"], saved["items"], saved["titles"]
        self.feature_names, self.counts = saved["features"], saved["counts"]
        self.rating_mean, self.rating_std = saved["rating_mean"], saved["rating_std"]
        try:
            history = load_file(str(run_dir / HISTORY))
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise RunDirError(f"{run_dir / HISTORY} is not a readable safetensors file: {e}") from None
        self.ptr, self.i = history["ptr"].numpy(), history["items"].numpy()
        self.features: np.ndarray | None = None  # saved in the weights; read again only to start training afresh

    # ---- what a run is -----------------------------------------------------------------------------

    @property
    def task(self) -> str:  # type: ignore[override]
        return "ranking" if self.cfg.target == "implicit" else "regression"

    @property
    def input_shape(self) -> tuple[int, ...]:  # type: ignore[override]
        """(user, item): a rating; (user, true item, negatives...): a training sample of the implicit target."""
        return (2,) if self.cfg.target == "rating" else (2 + self.cfg.negatives,)

    @property
    def target_scale(self) -> tuple[float, float]:
        return (self.rating_mean, self.rating_std)

    @property
    def target_name(self) -> str | None:
        return self.cfg.rating_column

    def block_fields(self) -> dict[str, dict[str, Any]]:
        sizes = {"users": len(self.user_ids), "items": len(self.item_ids)}
        return {"matrix_factorization": sizes, "two_tower": {**sizes, "features": len(self.feature_names)}}

    def check_model(self, specs: list[BlockSpec]) -> None:
        if not specs or specs[-1].type not in RECOMMENDERS:
            raise KilnError(f"model.blocks: an interactions model ends with one of {', '.join(RECOMMENDERS)} "
                            "(it scores each candidate item for a user)")

    def fill_model(self, model: torch.nn.Module) -> None:
        """The items' side features go into the blocks that read them (saved with the weights)."""
        if self.features is None:  # a resumed run that stopped before its first checkpoint starts afresh
            self.titles, self.feature_names, self.features = self._item_attributes()
        for module in model.modules():
            if hasattr(module, "set_item_features"):
                module.set_item_features(torch.from_numpy(self.features))

    def report(self) -> list[str]:
        c = self.counts
        lines = [f"interactions {self.source}: {c['interactions']:,} by {c['users']:,} users of {c['items']:,} items; "
                 f"split per user in time order: {c['train']:,} train, {c['val']:,} val (each user's "
                 f"data.val_last {self.cfg.val_last} before the test ones), {c['test']:,} test (the last "
                 f"data.test_last {self.cfg.test_last})"]
        if c["one_interaction_users"]:
            lines.append(f"{c['one_interaction_users']:,} users have one interaction: training only, not evaluated")
        if c["short_users"]:
            lines.append(f"{c['short_users']:,} users have fewer than {self.cfg.test_last + self.cfg.val_last + 1} "
                         "interactions: fewer held out (each keeps at least one for training)")
        if self.feature_names:
            lines.append(f"item side features: {len(self.feature_names)} ({', '.join(self.feature_names[:8])}"
                         f"{', ...' if len(self.feature_names) > 8 else ''})")
        return lines

    # ---- data --------------------------------------------------------------------------------------

    def load(self, progress=None) -> Splits:
        if not hasattr(self, "role"):  # reopened from a run: read the file again, check it is the same data
            saved_users, saved_items, saved_ptr, saved_items_seq = self.user_ids, self.item_ids, self.ptr, self.i
            self._read()
            if (self.user_ids != saved_users or self.item_ids != saved_items or not np.array_equal(self.ptr, saved_ptr)
                    or not np.array_equal(self.i, saved_items_seq)):
                raise DataError(f"data.path {self.cfg.path!r}: the file differs from the one this run was trained on "
                                f"(its users, items or interactions changed)")
        rows = np.stack([self.u, self.i, self.position], axis=1)
        parts = []
        for role in (0, 1, 2):
            keep = self.role == role
            x = torch.from_numpy(rows[keep].copy())
            if self.cfg.target == "rating":
                y = torch.from_numpy(((self.rating[keep] - self.rating_mean) / self.rating_std).astype(np.float32))
            else:
                y = torch.zeros(int(keep.sum()), dtype=torch.int64)  # the true item is candidate 0
            parts += [x, y]
        return Splits(*parts, checksums={self.source.name: self.digest})

    def save(self, run_path: Path) -> None:
        run_dir = RunDir(run_path)
        atomic_write_text(run_dir / MAPS, json.dumps({
            "users": self.user_ids, "items": self.item_ids, "titles": self.titles, "features": self.feature_names,
            "rating_mean": self.rating_mean, "rating_std": self.rating_std, "counts": self.counts}))
        history = {"ptr": torch.from_numpy(self.ptr.astype(np.int64)), "items": torch.from_numpy(self.i.copy())}
        atomic_write_bytes(run_dir / HISTORY, save(history))

    # A stored sample is (user, item, position); the model reads (user, candidate items...).

    def gather(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[idx, :2], y[idx]

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Implicit target: ``data.negatives`` uniformly drawn items after each true one (B, 2 + negatives)."""
        if self.cfg.target == "rating":
            return x
        negatives = torch.randint(len(self.item_ids), (len(x), self.cfg.negatives), generator=gen, device=gen.device)
        return torch.cat([x, negatives.to(x.device)], dim=1)

    def eval_batches(self, x: torch.Tensor, y: torch.Tensor, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Ratings: (user, item) pairs. Ranking: per held-out user, (user, every item) and a target per item:
        1 held out (relevant), -1 seen before the held-out interactions (left out of the ranking), 0 other."""
        if self.cfg.target == "rating":
            for start in range(0, len(x), size):
                yield x[start:start + size, :2], y[start:start + size]
            return
        users, targets = self.ranking_targets(x)
        n_items = len(self.item_ids)
        size = max(1, min(size, 2**24 // max(n_items, 1)))  # scores of a batch: at most 16M floats
        everything = torch.arange(n_items, dtype=torch.int64)
        for start in range(0, len(users), size):
            batch = users[start:start + size]
            ids = torch.cat([batch[:, None], everything.expand(len(batch), n_items)], dim=1)
            yield ids, targets[start:start + size]

    def ranking_targets(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The users of stored held-out rows ``x`` and their targets over all items (users, items) int8."""
        rows = x.cpu().numpy()
        users = np.unique(rows[:, 0])
        targets = np.zeros((len(users), len(self.item_ids)), dtype=np.int8)
        first = np.full(len(self.user_ids), np.iinfo(np.int64).max)
        np.minimum.at(first, rows[:, 0], rows[:, 2])
        slot = np.searchsorted(users, rows[:, 0])
        targets[slot, rows[:, 1]] = 1
        for k, user in enumerate(users):
            start = self.ptr[user]
            targets[k, self.i[start:start + first[user]]] = -1  # seen before: not ranked, not relevant
        return torch.from_numpy(users), torch.from_numpy(targets)

    # ---- inference -----------------------------------------------------------------------------------

    def as_stored(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.dim() == 2 else x[None]

    def random_inputs(self, n: int, gen: torch.Generator) -> torch.Tensor:
        users = torch.randint(len(self.user_ids), (n, 1), generator=gen)
        items = torch.randint(len(self.item_ids), (n, self.input_shape[0] - 1), generator=gen)
        return torch.cat([users, items], dim=1)

    def user_code(self, user: Any) -> int:
        if not hasattr(self, "_user_code"):
            self._user_code = {u: k for k, u in enumerate(self.user_ids)}
        code = self._user_code.get(str(user).strip())
        if code is None:
            raise KilnError(f"user {str(user)!r} is not in this run's data ({len(self.user_ids):,} users, e.g. "
                            f"{', '.join(self.user_ids[:3])}): it has no history to recommend from")
        return code

    def recommend(self, run, users: list[Any], top: int = 10) -> list[dict[str, Any]]:
        """The ``top`` best-scored items for each user that the user has not interacted with, best first: one record
        per (user, rank) with the item id, its title where known, and its score (a predicted rating, for ratings)."""
        if not 1 <= top <= min(MAX_TOP, len(self.item_ids)):
            raise KilnError(f"--top must be 1 to {min(MAX_TOP, len(self.item_ids))}, not {top}")
        codes = [self.user_code(u) for u in users]
        n_items = len(self.item_ids)
        ids = torch.cat([torch.tensor(codes)[:, None], torch.arange(n_items).expand(len(codes), n_items)], dim=1)
        scores = run.outputs(ids).double()
        if self.cfg.target == "rating":
            scores = scores * self.rating_std + self.rating_mean
        records = []
        for row, (user, code) in enumerate(zip(users, codes, strict=True)):
            s = scores[row].clone()
            s[torch.from_numpy(self.i[self.ptr[code]:self.ptr[code + 1]])] = -torch.inf
            best = torch.topk(s, min(top, int(torch.isfinite(s).sum()))).indices.tolist()
            for rank, item in enumerate(best, 1):
                records.append({"user": self.user_ids[code], "rank": rank, "item": self.item_ids[item],
                                **({"title": self.titles[item]} if self.titles else {}),
                                "score": round(float(s[item]), 6)})
        return records

    def render(self, records: list[dict[str, Any]]) -> str:
        """Tab-separated lines: user, rank, item, score (and title, where the run has titles)."""
        lines = ["user\trank\titem\tscore" + ("\ttitle" if self.titles else "")]
        for r in records:
            title = f"\t{r['title']}" if self.titles else ""
            lines.append(f"{r['user']}\t{r['rank']}\t{r['item']}\t{r['score']:.4f}{title}")
        return "\n".join(lines) + "\n"

    def predict_files(self, run, paths: list[str | Path]) -> list[dict[str, Any]]:
        raise KilnError(f"{run.path} is a recommendation run; {self.usage}")

    def inputs(self) -> UserInputs:
        return UserInputs(self.user_code, len(self.user_ids), min(MAX_TOP, len(self.item_ids)))

    def decode_batch(self, run, batch: np.ndarray) -> np.ndarray:
        """Per request ``{"user", "top"}``: its ranked items."""
        answers = []
        for request in batch:
            records = self.recommend(run, [request["user"]], request["top"])
            answers.append([{k: v for k, v in r.items() if k not in ("user", "rank")} for r in records])
        return objects(answers)

