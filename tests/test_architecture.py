"""The shape of the code: the import-layer contracts hold, nothing outside ``kiln.data`` asks which kind of data
a run has, and the light commands stay light."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "kiln"
KINDS = r"(mnist|tabular|text|text_pairs|images|image_folder|timeseries|interactions)"
# A branch on the kind of data: an isinstance check of a kind's class, or a comparison with a kind's name.
BRANCH = re.compile(r"isinstance\([^)]*\b(Mnist|Tabular|Text\w*|Image\w*|Table\w*)\b|"
                    r"\b\w*(dataset|kind)\w*\s*(==|!=|\bin\b|\bnot in\b)\s*[\(\[{]?\s*[\"']" + KINDS + r"[\"']")


def test_import_layer_contracts_hold():
    """pyproject.toml's [tool.importlinter] contracts: layers, model code and data kept apart, no cycles."""
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_only_the_data_package_branches_on_the_kind_of_data():
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
            for p in sorted(SRC.rglob("*.py")) if "data" not in p.relative_to(SRC).parts[:1]
            for i, line in enumerate(p.read_text().splitlines(), 1) if BRANCH.search(line)]
    assert not hits, "ask the kind of data instead:\n" + "\n".join(hits)


def test_help_does_not_import_torch():
    """`kiln --help` is answered without importing PyTorch (seconds on a small machine)."""
    probe = ("import sys\nfrom kiln.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
             "print('torch' in sys.modules, 'kiln.config' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "False False", done.stdout
