"""scripts/results_table.py: README.md's results table is the one the JSON files give, each row from the newest
file of its benchmark and variant, and a file the script cannot read is named in one error line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "results_table.py"
README = "# x\n\n## Results\n\n<!-- results:begin -->\nstale\n<!-- results:end -->\n\n## Tests\n"


def run_script(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def nanogpt(kiln_loss: float, threads: int | None = None, reps: int = 1) -> dict:
    """A bench_nanogpt.py result with what the table reads; kiln_loss tells the files apart in the table."""
    return {"args": {"reps": reps, "threads": threads, "seed": 1337, "floor": False, "worker": None},
            "hardware": {"cpu": "Test CPU", "cores": 2, "python": "3.11.7"}, "threads": threads, "torch": "2.13.0",
            "results": {"plain": [{"loop_seconds": 100.0, "val_loss": 1.9, "threads": 2}] * reps,
                        "kiln": [{"loop_seconds": 90.0, "val_loss": kiln_loss, "threads": 2}] * reps}}


def write(folder: Path, name: str, content: dict | str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(content if isinstance(content, str) else json.dumps(content))


def table_rows(readme: Path) -> list[str]:
    text = readme.read_text()
    return [line for line in text[text.index("<!-- results:begin -->"):].splitlines()[3:]
            if line.startswith("| ")]


def test_readme_table_is_current() -> None:
    done = run_script("--check")
    assert done.returncode == 0, done.stderr


def test_newest_file_per_variant(tmp_path: Path) -> None:
    results, readme = tmp_path / "results", tmp_path / "README.md"
    readme.write_text(README)
    # Written newest first: the time in the name decides, not the file's age on disk.
    write(results, "nanogpt-20260103T000000Z.json", nanogpt(1.333, threads=1))
    write(results, "nanogpt-20260102T000000Z.json", nanogpt(1.222, reps=2))  # more reps: the same variant
    write(results, "nanogpt-20260101T000000Z.json", nanogpt(1.111))

    done = run_script("--results", results, "--readme", readme)
    assert done.returncode == 0, done.stderr
    rows = table_rows(readme)
    assert len(rows) == 2, rows
    assert "kiln 1.222" in rows[0] and "`python benchmarks/bench_nanogpt.py`" in rows[0]  # default variant first
    assert "kiln 1.333" in rows[1] and "--threads 1" in rows[1]
    assert "1.111" not in readme.read_text() and "stale" not in readme.read_text()
    assert readme.read_text().startswith("# x\n\n## Results\n\n") and readme.read_text().endswith("\n\n## Tests\n")
    assert run_script("--check", "--results", results, "--readme", readme).returncode == 0

    write(results, "nanogpt-20260104T000000Z.json", nanogpt(1.444))  # a newer run: README is out of date
    done = run_script("--check", "--results", results, "--readme", readme)
    assert done.returncode == 1
    assert "results_table.py" in done.stderr and "Traceback" not in done.stderr
    assert "1.444" not in readme.read_text()  # --check writes nothing


def malformed(fault: str) -> dict:
    """A nanogpt result without its results ("missing") or with a text for a loss (read only when rendered)."""
    data = nanogpt(1.5)
    if fault == "missing":
        del data["results"]
    else:
        data["results"]["kiln"][0]["val_loss"] = "low"
    return data


@pytest.mark.parametrize("name, content, message", [
    ("nanogpt-20260102T000000Z.json", '{"results": ', "cannot be read as JSON"),
    ("nanogpt-20260102T000000Z.json", malformed("missing"), "missing field 'results'"),
    ("nanogpt-20260102T000000Z.json", malformed("wrong type"), "not a nanogpt result"),
    ("german_credit-20260101T000000Z.json", nanogpt(1.5), "unknown benchmark 'german_credit'"),
    ("notes.json", nanogpt(1.5), "not named <benchmark>-<YYYYMMDDTHHMMSSZ>.json"),
])
def test_unreadable_file_is_named(tmp_path: Path, name: str, content: dict | str, message: str) -> None:
    results, readme = tmp_path / "results", tmp_path / "README.md"
    readme.write_text(README)
    write(results, "nanogpt-20260101T000000Z.json", nanogpt(1.2))  # an older, good file beside the bad one
    write(results, name, content)
    done = run_script("--results", results, "--readme", readme)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    assert name in done.stderr and message in done.stderr, done.stderr
    assert readme.read_text() == README


def test_readme_without_markers(tmp_path: Path) -> None:
    results, readme = tmp_path / "results", tmp_path / "README.md"
    readme.write_text("# x\n\n## Results\n")
    write(results, "nanogpt-20260101T000000Z.json", nanogpt(1.5))
    done = run_script("--results", results, "--readme", readme)
    assert done.returncode == 2
    assert str(readme) in done.stderr and "<!-- results:begin -->" in done.stderr


def tables(stamp_configs: list[str], kiln: float, config: list[str] | None = None) -> dict:
    """A bench_tables.py result of these configs; kiln's ROC-AUC tells the files apart in the table."""
    score = {"roc_auc": {"mean": kiln, "std": 0.01}, "pr_auc": {"mean": 0.5}}
    return {"settings": {"config": config or [], "folds": 5, "rows": None, "first_folds": None, "variant": [],
                         "no_default": False, "no_baselines": False, "seeds": None, "jobs": 1},
            "conditions": {"cpu": "Test CPU", "cores": 2, "python": "3.11.7", "torch": "2.13.0",
                           "scikit-learn": "1.9.1", "kiln": "0.1.0"},
            "tables": {f"/somewhere/examples/{c}.yaml": {"rows": 1000, "results": {"kiln": score}}
                       for c in stamp_configs}}


def test_a_run_of_some_configs_gives_way_to_a_newer_run_of_all(tmp_path: Path) -> None:
    results, readme = tmp_path / "results", tmp_path / "README.md"
    readme.write_text(README)
    write(results, "tables-20260101T000000Z.json", tables(["bank"], 0.7111, config=["examples/bank.yaml"]))
    write(results, "tables-20260102T000000Z.json", tables(["german"], 0.7222, config=["examples/german.yaml"]))
    write(results, "tables-20260103T000000Z.json", tables(["german", "bank"], 0.7333))
    write(results, "tables-20260104T000000Z.json", tables(["bank"], 0.7444, config=["examples/bank.yaml"]))
    write(results, "tables-20260105T000000Z.json", tables(["other"], 0.7555, config=["examples/other.yaml"]))
    done = run_script("--results", results, "--readme", readme)
    assert done.returncode == 0, done.stderr
    text = readme.read_text()
    # Older runs of part of the whole give way; a newer part, or a config the whole did not run, keep their rows.
    assert "0.7111" not in text and "0.7222" not in text
    assert all(f"kiln {x}" in text for x in ("0.7333", "0.7444", "0.7555")), text
    assert len(table_rows(readme)) == 3
