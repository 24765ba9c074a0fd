"""Reading a table (CSV or Parquet) into raw text columns, with errors that name the line and column.

Every value stays the text the file holds (None where it is missing): deciding what a column means
is the job of :mod:`kiln.data.preprocess`, which sees CSV files, Parquet files and the rows a
client sends (a list of dicts) in this one form.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import DataError

# Cells that mean "no value", compared after stripping spaces.
MISSING = frozenset({"", "na", "n/a", "nan", "null", "none", "?"})
DELIMITERS = ",;\t|"
SNIFF_CHARS = 64 * 1024  # read to tell the delimiter and quoting


@dataclass
class Table:
    """Raw columns of equal length. ``where[i]`` names row i for error messages ("line 7")."""

    source: str
    columns: dict[str, list[str | None]]
    where: list[str]

    def __len__(self) -> int:
        return len(self.where)

    def take(self, rows: list[int]) -> Table:
        return Table(self.source, {k: [v[i] for i in rows] for k, v in self.columns.items()},
                     [self.where[i] for i in rows])


def cell(value: object) -> str | None:
    """A raw value as text; None for a missing one."""
    if value is None:
        return None
    text = str(value).strip()
    return None if text.lower() in MISSING else text


def read_table(path: Path) -> Table:
    """A CSV or Parquet file's rows; a DataError naming the file and line for anything malformed or empty."""
    if not path.is_file():
        raise DataError(f"{path}: no such file" if not path.exists() else f"{path} is not a regular file")
    table = _read_parquet(path) if path.suffix.lower() in (".parquet", ".pq") else _read_csv(path)
    if not len(table):
        raise DataError(f"{path} names its columns ({', '.join(table.columns)[:200]}) but holds no rows")
    return table


def rows_to_table(rows: list[dict], source: str = "rows") -> Table:
    """Rows as a client sends them (a list of dicts, e.g. parsed JSON) to a Table."""
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{source}: expected a list of rows, each a mapping of column name to value")
    names = list(dict.fromkeys(k for r in rows for k in r))
    columns = {str(n): [cell(r[n]) if n in r else None for r in rows] for n in names}
    return Table(source, columns, [f"row {i + 1}" for i in range(len(rows))])


def _read_csv(path: Path) -> Table:
    """Opened with ``newline=''`` so that a quoted field may hold line breaks; the delimiter is sniffed from the
    start of the file (``csv.Sniffer``), else the one of DELIMITERS that the header line holds most of."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            sample = f.read(SNIFF_CHARS)
            f.seek(0)
            if not sample.strip():
                raise DataError(f"{path} is empty; a CSV needs a header line naming the columns")
            dialect = _dialect(sample)
            reader = csv.reader(f, dialect)
            try:
                header = [h.strip() for h in next(reader)]
                _check_header(header, path)
                rows, where = [], []
                for row in reader:
                    if not row or all(not v.strip() for v in row):
                        continue  # blank line
                    if len(row) != len(header):
                        raise DataError(
                            f"{path}, line {reader.line_num}: {len(row)} fields but the header names {len(header)} "
                            f"columns. Fix: quote values that contain {dialect.delimiter!r}, and give every row one "
                            "value per column (an empty field for a missing value)")
                    rows.append(row)
                    where.append(f"line {reader.line_num}")
            except csv.Error as e:
                raise DataError(f"{path}, line {reader.line_num}: not valid CSV: {e}") from None
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8 CSV") from None
    columns = {name: [cell(r[j]) for r in rows] for j, name in enumerate(header)}
    return Table(str(path), columns, where)


def _dialect(sample: str) -> type[csv.Dialect] | csv.Dialect:
    try:
        return csv.Sniffer().sniff(sample, delimiters=DELIMITERS)
    except csv.Error:  # one column, or too little text to tell
        first = sample.splitlines()[0] if sample.splitlines() else ""

        class Plain(csv.excel):
            delimiter = max(DELIMITERS, key=first.count)

        return Plain


def _read_parquet(path: Path) -> Table:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install 'kiln[tabular]'") from None
    try:
        data = pq.read_table(path).to_pydict()
    except (OSError, ValueError) as e:  # pyarrow's errors derive from these
        raise DataError(f"{path} is not a readable Parquet file: {e}") from None
    _check_header(list(data), path)
    n = len(next(iter(data.values()), []))
    columns = {name: [cell(v) for v in values] for name, values in data.items()}
    return Table(str(path), columns, [f"row {i + 1}" for i in range(n)])


def _check_header(header: list[str], path: Path) -> None:
    for j, name in enumerate(header):
        if not name:
            raise DataError(f"{path}: column {j + 1} of the header has no name; name every column")
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise DataError(f"{path}: the header names column {dupes[0]!r} more than once; column names must be unique")
