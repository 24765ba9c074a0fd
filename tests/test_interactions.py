"""Recommendation (``dataset: interactions``): the per-user time-ordered split, the ranking metrics against
hand-computed values, real training on MovieLens beating popularity, reload, serving, and bad input."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kiln
from kiln.config import load_config
from kiln.data.kind import open_kind
from kiln.errors import ConfigError, DataError, KilnError
from kiln.training.metrics import ranking_metrics

ROOT = Path(__file__).parent.parent


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def cfg_dict(path, **data):
    return {"name": "recs", "seed": 0,
            "data": {"dataset": "interactions", "path": str(path), "user_column": "u", "item_column": "i",
                     "time_column": "t", **data},
            "model": {"blocks": [{"type": "matrix_factorization", "dim": 8}]},
            "train": {"epochs": 2, "batch_size": 16, "optimizer": {"name": "adam", "lr": 0.01}, "threads": 1}}


@pytest.fixture
def tiny(tmp_path):
    """Three users: a (6 interactions, times out of file order), b (one), c (three)."""
    rows = [("a", "i1", 50), ("a", "i2", 10), ("a", "i3", 60), ("a", "i4", 20), ("a", "i5", 40), ("a", "i6", 30),
            ("b", "i1", 5), ("c", "i3", 3), ("c", "i2", 1), ("c", "i4", 2)]
    return write_csv(tmp_path / "tiny.csv", ["u", "i", "t"], rows)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """40 users in two taste groups over 30 items (even / odd items), each with 12 interactions in time order,
    plus one user with a single interaction; item titles."""
    folder = tmp_path_factory.mktemp("synthetic")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for user in range(40):
        items = torch.randperm(15, generator=gen)[:12] * 2 + user % 2
        rows += [(f"u{user}", f"m{int(item)}", 100 * user + k) for k, item in enumerate(items)]
    rows.append(("lonely", "m0", 5))
    path = write_csv(folder / "ratings.csv", ["u", "i", "t"], rows)
    write_csv(folder / "items.csv", ["i", "name"], [(f"m{k}", f"Movie {k}") for k in range(30)])
    return path


@pytest.fixture(scope="module")
def synthetic_run(synthetic, tmp_path_factory):
    cfg = cfg_dict(synthetic, test_last=2, val_last=2, negatives=8, items_path=str(synthetic.parent / "items.csv"),
                   items_id_column="i", title_column="name")
    return kiln.train(cfg, {"train.epochs": 15, "train.optimizer.lr": 0.05},
                      out=tmp_path_factory.mktemp("runs") / "recs", live=False)


# ---- the split ---------------------------------------------------------------------------------------------------

def test_split_holds_out_each_users_last_interactions_in_time_order(tiny):
    kind = open_kind(load_config(cfg_dict(tiny, test_last=2, val_last=1)).data, 0)
    splits = kind.load()

    def items_of(split, user):
        x = splits.split(split)[0]
        code = kind.user_ids.index(user)
        return sorted(kind.item_ids[int(i)] for u, i, _ in x.tolist() if u == code)

    # a in time order: i2 (10), i4 (20), i6 (30), i5 (40), i1 (50), i3 (60)
    assert items_of("test", "a") == ["i1", "i3"]
    assert items_of("val", "a") == ["i5"]
    assert items_of("train", "a") == ["i2", "i4", "i6"]
    # b has one interaction: training only
    assert items_of("train", "b") == ["i1"] and items_of("val", "b") == [] and items_of("test", "b") == []
    # c has three: one kept for training, the last two tested, none left for validation
    assert items_of("train", "c") == ["i2"] and items_of("test", "c") == ["i3", "i4"] and items_of("val", "c") == []
    assert kind.counts["one_interaction_users"] == 1
    report = "\n".join(kind.report())
    assert "1 users have one interaction: training only" in report


def test_ranking_targets_leave_out_what_the_user_saw_before(tiny):
    kind = open_kind(load_config(cfg_dict(tiny, test_last=2, val_last=1)).data, 0)
    splits = kind.load()
    users, targets = kind.ranking_targets(splits.test_x)
    a = users.tolist().index(kind.user_ids.index("a"))
    row = {kind.item_ids[k]: int(v) for k, v in enumerate(targets[a])}
    # before the test: train i2 i4 i6 and validation i5 are seen (left out); i1 i3 are held out
    assert row == {"i1": 1, "i2": -1, "i3": 1, "i4": -1, "i5": -1, "i6": -1}
    users, targets = kind.ranking_targets(splits.val_x)
    row = {kind.item_ids[k]: int(v) for k, v in enumerate(targets[users.tolist().index(kind.user_ids.index("a"))])}
    assert row == {"i1": 0, "i2": -1, "i3": 0, "i4": -1, "i5": 1, "i6": -1}  # the future is neither seen nor relevant


# ---- the metrics -------------------------------------------------------------------------------------------------

def test_ranking_metrics_match_hand_computed_values():
    scores = torch.stack([12.0 - torch.arange(12.0), torch.zeros(12), torch.zeros(12)])
    targets = torch.zeros(3, 12, dtype=torch.int8)
    targets[0, 0] = -1  # seen: left out, so the ranking of user 0 is items 1, 2, 3, ...
    targets[0, 2] = targets[0, 11] = 1  # relevant: ranks 2 and 11
    targets[1, 5] = 1  # all scores tie: index order, so item 5 is rank 6
    m = ranking_metrics(scores, targets)  # user 2 has nothing held out: not counted
    assert m["samples"] == 2
    assert m["recall@10"] == pytest.approx((1 / 2 + 1) / 2)
    ndcg0 = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert m["ndcg@10"] == pytest.approx((ndcg0 + 1 / math.log2(7)) / 2)
    assert m["hit_rate@10"] == 1.0
    lse0 = math.log(sum(math.exp(12 - i) for i in range(1, 12)))
    loss0 = [lse0 - (12 - 2), lse0 - (12 - 11)]
    assert m["loss"] == pytest.approx((sum(loss0) + math.log(12)) / 3)


def test_a_miss_scores_zero():
    scores = torch.arange(20.0)[None]  # item 19 first
    targets = torch.zeros(1, 20, dtype=torch.int8)
    targets[0, 0] = 1  # ranked last
    m = ranking_metrics(scores, targets)
    assert (m["recall@10"], m["ndcg@10"], m["hit_rate@10"]) == (0.0, 0.0, 0.0)


# ---- training, reload, predict, serve ----------------------------------------------------------------------------

def test_training_learns_the_taste_groups_and_reloads_identically(synthetic_run):
    run = synthetic_run
    test = run.metrics["test"]
    assert test["samples"] == 40  # the lonely user is not evaluated
    # Each user's 2 held-out items are among the 7 unseen items of their group's 15; a random top 10 of the 20 unseen
    # items would hold half of them (recall 0.5), the group's 7 at the top all of them.
    assert test["recall@10"] >= 0.9, test
    again = kiln.Run.load(run.path)
    assert again.evaluate("test") == test  # the same numbers from the run directory alone
    recs = run.recommend(["u3"], top=5)
    assert recs == again.recommend(["u3"], top=5)
    code = run.kind.user_ids.index("u3")
    seen = {run.kind.item_ids[i] for i in run.kind.i[run.kind.ptr[code]:run.kind.ptr[code + 1]]}
    assert [r["rank"] for r in recs] == [1, 2, 3, 4, 5]
    assert not seen & {r["item"] for r in recs}, "recommendations leave out what the user has seen"
    firsts = run.recommend([f"u{k}" for k in range(40)], top=1)
    same_group = sum(int(r["item"][1:]) % 2 == int(r["user"][1:]) % 2 for r in firsts)
    assert same_group >= 36, f"{same_group} of 40 users get an item of their own group first"
    assert recs[0]["title"] == f"Movie {recs[0]['item'][1:]}"


def test_resumed_training_equals_an_uninterrupted_one(synthetic, tmp_path):
    cfg = cfg_dict(synthetic, test_last=2, val_last=2, negatives=8)
    whole = kiln.train(cfg, {"train.epochs": 2}, out=tmp_path / "whole", live=False)
    kiln.train(cfg, {"train.epochs": 1}, out=tmp_path / "part", live=False)
    resumed = kiln.train(cfg, {"train.epochs": 2}, out=tmp_path / "part", resume=True, live=False)
    assert resumed.metrics["test"] == whole.metrics["test"]
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_two_tower_reads_the_items_side_features(synthetic, tmp_path):
    folder = synthetic.parent
    write_csv(folder / "genres.csv", ["i", "g"], [(f"m{k}", "Odd|Any" if k % 2 else "Even|Any") for k in range(30)])
    cfg = cfg_dict(synthetic, test_last=2, val_last=2, negatives=8, items_path=str(folder / "genres.csv"),
                   items_id_column="i", features_column="g")
    cfg["model"]["blocks"] = [{"type": "two_tower", "dim": 8, "hidden": 16, "out": 8}]
    run = kiln.train(cfg, out=tmp_path / "tt", live=False)
    features = run.model.blocks[0].item_features
    assert features.shape == (30, 3) and run.kind.feature_names == ["Any", "Even", "Odd"]
    assert features[run.kind.item_ids.index("m3")].tolist() == [1.0, 0.0, 1.0]
    again = kiln.Run.load(run.path)
    assert torch.equal(again.model.blocks[0].item_features, features)  # saved with the weights
    assert again.evaluate("test") == run.metrics["test"]


def test_rating_target_reports_rmse_in_stars(tmp_path):
    gen = torch.Generator().manual_seed(1)
    rows = [(f"u{u}", f"m{i}", float(1 + (u + i) % 5), u * 100 + i) for u in range(30)
            for i in torch.randperm(20, generator=gen)[:10].tolist()]
    path = write_csv(tmp_path / "r.csv", ["u", "i", "r", "t"], rows)
    cfg = cfg_dict(path, target="rating", rating_column="r", test_last=2, val_last=2)
    cfg["train"]["epochs"] = 3
    run = kiln.train(cfg, out=tmp_path / "run", live=False)
    test = run.metrics["test"]
    assert run.kind.task == "regression" and set(test) >= {"rmse", "mae"}
    assert kiln.Run.load(run.path).evaluate("test") == test
    recs = run.recommend(["u1"], top=3)
    assert all(0.0 < r["score"] < 7.0 for r in recs)  # predicted ratings, in stars


def test_cli_predict_user_and_unknown_user(synthetic_run):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-m", "kiln", "predict", str(synthetic_run.path), "--user", "u2", "--top",
                          "3"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "user\trank\titem\tscore\ttitle" and len(lines) == 4 and "Movie" in lines[1]
    bad = subprocess.run([sys.executable, "-m", "kiln", "predict", str(synthetic_run.path), "--user", "nobody"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "error: user 'nobody' is not in this run's data" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_served_top_k_excludes_seen_items(synthetic_run):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from kiln.serve import create_app

    with TestClient(create_app(synthetic_run.path)) as c:
        r = c.post("/v1/predict", json={"instances": [{"user": "u5", "top": 4}, {"user": "lonely"}]})
        assert r.status_code == 200, r.text
        first, second = r.json()["predictions"]
        assert [x["item"] for x in first["items"]] == [x["item"] for x in synthetic_run.recommend(["u5"], 4)]
        assert len(second["items"]) == 10 and "m0" not in {x["item"] for x in second["items"]}
        bad = c.post("/v1/predict", json={"instances": [{"user": "u5"}, {"user": "ghost"}]})
        assert bad.status_code == 422 and "instances.1.user" in bad.text and "ghost" in bad.text
        assert c.get("/v1/model").json()["task"] == "ranking"
        schema = c.get("/openapi.json").json()["components"]["schemas"]
        assert "UserInstance" in schema and "RankedItem" in schema


# ---- bad input ---------------------------------------------------------------------------------------------------

def test_unknown_column_is_named(tiny):
    with pytest.raises(DataError, match=r"data.user_column: .* has no column 'user'.*u, i, t"):
        open_kind(load_config(cfg_dict(tiny, user_column="user")).data, 0)


def test_bad_settings_name_the_field(tiny):
    with pytest.raises(ConfigError, match="rating_column"):
        load_config(cfg_dict(tiny, target="rating"))
    with pytest.raises(ConfigError, match="val_last"):
        load_config(cfg_dict(tiny, val_fraction=0.2))


def test_dates_order_the_timeline_and_bad_times_are_named(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["u", "i", "t"], [("a", "x", "2024-03-01"), ("a", "y", "2024-01-01T10:00"),
                                                           ("a", "z", "2024-02-01")])
    kind = open_kind(load_config(cfg_dict(path, test_last=1, val_last=1)).data, 0)
    splits = kind.load()
    assert [kind.item_ids[int(i)] for i in splits.test_x[:, 1]] == ["x"]
    assert [kind.item_ids[int(i)] for i in splits.val_x[:, 1]] == ["z"]
    write_csv(path, ["u", "i", "t"], [("a", "x", "soon"), ("a", "y", "1")])
    with pytest.raises(DataError, match=r"data.time_column: .* line 2: 'soon' in column 't' is not a number or an ISO"):
        open_kind(load_config(cfg_dict(path)).data, 0)


def test_only_one_interaction_per_user_leaves_nothing_to_test(tmp_path):
    path = write_csv(tmp_path / "one.csv", ["u", "i", "t"], [("a", "x", 1), ("b", "y", 2)])
    with pytest.raises(DataError, match="no user .* has two interactions"):
        open_kind(load_config(cfg_dict(path)).data, 0)


def test_unknown_user_is_a_clear_error(synthetic_run):
    with pytest.raises(KilnError, match="user 'ghost' is not in this run's data"):
        synthetic_run.recommend(["ghost"])
    with pytest.raises(KilnError, match="--top must be 1 to 30"):
        synthetic_run.recommend(["u1"], top=0)


# ---- MovieLens -----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_movielens_model_beats_popularity_on_ndcg(tmp_path):
    data = Path(os.environ.get("KILN_DATA", "")) / "movielens_small" / "ratings.csv"
    if not os.environ.get("KILN_DATA") or not data.is_file():
        pytest.skip("MovieLens unavailable: set KILN_DATA to a folder with movielens_small/ratings.csv")
    run = kiln.train(ROOT / "examples" / "movielens.yaml", {"train.epochs": 3, "train.threads": 2},
                     out=tmp_path / "ml", live=False)
    splits = run.kind.load()
    popularity = torch.bincount(splits.train_x[:, 1], minlength=len(run.kind.item_ids)).double()
    users, targets = run.kind.ranking_targets(splits.test_x)
    baseline = ranking_metrics(popularity.expand(len(users), -1), targets)
    assert run.metrics["test"]["ndcg@10"] > baseline["ndcg@10"], (run.metrics["test"], baseline)
