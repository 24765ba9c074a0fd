"""A time series read from a table: its time column parsed and checked (order, duplicates, gaps), the step it
advances by, calendar features, and the target transforms with their inverses.

Everything here is plain numpy on whole arrays; :mod:`kiln.data.timeseries` builds windows from it.
"""

from __future__ import annotations

import math
import re
from calendar import monthrange
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np

from kiln.data.table import Table
from kiln.errors import DataError

FREQUENCIES = ("auto", "step", "hour", "day", "business_day", "week", "month", "quarter", "year")
CALENDAR = ("month", "quarter", "day_of_week", "day_of_month", "day_of_year", "hour")
# A transform is a chain of steps applied to the target before scaling (and undone after the model).
TRANSFORMS = {"none": (), "log": ("log",), "diff": ("diff",), "log_return": ("log", "diff"),
              "seasonal_diff": ("seasonal_diff",), "log_seasonal_diff": ("log", "seasonal_diff")}
_MONTH = re.compile(r"^(\d{4})-(\d{1,2})$")
_INT = re.compile(r"^[+-]?\d+$")
EPOCH = datetime(1970, 1, 1)
_UNITS = {"hour": "hour", "day": "day", "business_day": "business day", "week": "week", "month": "month",
          "quarter": "quarter", "year": "year", "step": "step"}


@dataclass
class Times:
    """Parsed times of a series in order. ``index``: each time's step number under ``frequency`` (consecutive
    steps differ by 1); ``style`` says how to write a time back (``month``, ``date``, ``datetime``, ``int``)."""

    values: list  # datetime or int, one per row
    style: str
    frequency: str

    def steps(self) -> np.ndarray:
        return step_index(self.values, self.frequency)

    def after(self, count: int) -> list[str]:
        """The ``count`` times after the last one, written as the file writes its times."""
        last = self.values[-1]
        return [format_time(advance(last, self.frequency, h), self.style) for h in range(1, count + 1)]

    def text(self, i: int) -> str:
        return format_time(self.values[i], self.style)


def parse_time(text: str | None, where: str, column: str) -> tuple[datetime | int, str]:
    """One cell of the time column: an integer step, ``YYYY-MM``, or an ISO date or date and time."""
    if text is None:
        raise DataError(f"{where}: the time column {column!r} is empty; every row needs its time")
    if _INT.match(text) and len(text.lstrip("+-")) != 8:  # 19860313 reads as a date below
        return int(text), "int"
    m = _MONTH.match(text)
    if m and 1 <= int(m.group(2)) <= 12:
        return datetime(int(m.group(1)), int(m.group(2)), 1), "month"
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise DataError(f"{where}: {text!r} in the time column {column!r} is not a time; write times as ISO dates "
                        "(2020-01-31), date and time (2020-01-31 14:00), months (2020-01) or integer steps") from None
    if value.tzinfo is not None:
        value = value.replace(tzinfo=None) - (value.utcoffset() or timedelta(0))  # UTC, so steps compare
    plain_date = value.hour == value.minute == value.second == value.microsecond == 0 and len(text) <= 10
    return value, "date" if plain_date else "datetime"


def format_time(value: datetime | int, style: str) -> str:
    if style == "int":
        return str(value)
    if style == "month":
        return f"{value.year:04d}-{value.month:02d}"
    if style == "date":
        return value.date().isoformat()
    return value.isoformat(sep=" ")


def read_times(table: Table, column: str, frequency: str, allow_gaps: bool) -> tuple[Times, list[int]]:
    """The time column parsed, checked and put in order: (times, the row order that sorts them).

    Refused with the rows named: an empty or unreadable time, mixed styles, a time twice, and (unless
    ``allow_gaps``) a gap, where a step is missing between two rows."""
    if column not in table.columns:
        raise DataError(f"data.time: {table.source} has no column {column!r}; its columns are "
                        f"{', '.join(table.columns)}")
    cells = table.columns[column]
    parsed = [parse_time(v, f"{table.source}, {table.where[i]}", column) for i, v in enumerate(cells)]
    styles = {s for _, s in parsed}
    if "int" in styles and len(styles) > 1:
        raise DataError(f"data.time: the column {column!r} of {table.source} mixes integer steps and dates")
    style = "datetime" if "datetime" in styles else styles.pop() if len(styles) == 1 else "date"
    values = [v for v, _ in parsed]
    order = sorted(range(len(values)), key=lambda i: values[i])
    values = [values[i] for i in order]
    for k in range(1, len(values)):
        if values[k] == values[k - 1]:
            i, j = sorted((order[k - 1], order[k]))
            raise DataError(f"data.time: {table.source} has the time {format_time(values[k], style)} twice "
                            f"({table.where[i]} and {table.where[j]}); keep one row per time")
    freq = infer_frequency(values, style) if frequency == "auto" else frequency
    if style == "int" and freq != "step":
        raise DataError(f"data.frequency: {freq} needs dates in the time column {column!r}, which holds integer "
                        "steps; use frequency: step (or auto)")
    if style != "int" and freq == "step":
        raise DataError(f"data.frequency: step needs integer times; the column {column!r} holds dates")
    times = Times(values, style, freq)
    index = times.steps()
    jumps = np.diff(index)
    if len(jumps) and (jumps <= 0).any():
        k = int(np.flatnonzero(jumps <= 0)[0]) + 1
        raise DataError(f"data.time: {times.text(k - 1)} ({table.where[order[k - 1]]}) and {times.text(k)} "
                        f"({table.where[order[k]]}) fall in the same {_UNITS[freq]}; keep one row per "
                        f"{_UNITS[freq]}, or set data.frequency")
    if not allow_gaps and len(jumps) and (jumps != 1).any():
        bad = np.flatnonzero(jumps != 1)
        k = int(bad[0]) + 1
        missing = int(jumps[bad].sum() - len(bad))
        raise DataError(
            f"data.time: the series has gaps: {times.text(k)} ({table.where[order[k]]}) comes {int(jumps[k - 1])} "
            f"{_UNITS[freq]}s after {times.text(k - 1)} ({table.where[order[k - 1]]}); {len(bad)} gap(s), "
            f"{missing} missing {_UNITS[freq]}(s) in all (frequency {freq}). Fill the missing times, or set "
            "data.allow_gaps: true to take each row as the next step (trading days, for instance)")
    return times, order


def infer_frequency(values: list, style: str) -> str:
    """The step of a series: the most common spacing of its times, in calendar units."""
    if style == "int":
        return "step"
    if len(values) < 2:
        raise DataError("data.time: one row cannot tell the frequency; give more rows or set data.frequency")
    if style == "month":
        return "month"
    spacing, counts = np.unique(np.diff([_seconds(v) for v in values]), return_counts=True)
    common = float(spacing[counts.argmax()])  # the most common spacing; on a tie, the shortest
    day = 86400.0
    if common <= 3 * day and all(v.weekday() < 5 and v.time() == values[0].time() for v in values):
        days = np.array([v.date() for v in values], dtype="datetime64[D]")
        steps, counts = np.unique(np.busday_count(days[:-1], days[1:]), return_counts=True)
        if steps[counts.argmax()] == 1:  # one working day apart, most often: Friday to Monday too
            return "business_day"
    for name, shortest, longest in (("month", 28, 31), ("quarter", 89, 92), ("year", 365, 366)):
        if shortest * day <= common <= longest * day:  # calendar months and years vary in length
            return name
    if common == 7 * day:
        return "week"
    if common == day:
        return "day"
    if common == 3600.0:
        return "hour"
    raise DataError(f"data.frequency: cannot tell the step of the time column (its most common spacing is "
                    f"{common:g} s); set data.frequency to one of {', '.join(FREQUENCIES[1:])}")


def step_index(values: list, frequency: str) -> np.ndarray:
    """Each time's step number: consecutive steps of the frequency differ by exactly 1."""
    if frequency == "step":
        return np.asarray(values, dtype=np.int64)
    if frequency in ("month", "quarter", "year"):
        months = np.array([v.year * 12 + v.month - 1 for v in values], dtype=np.int64)
        return months // {"month": 1, "quarter": 3, "year": 12}[frequency]
    if frequency == "business_day":
        days = np.array([v.date() for v in values], dtype="datetime64[D]")
        weekend = np.is_busday(days)
        if not weekend.all():
            k = int(np.flatnonzero(~weekend)[0])
            raise DataError(f"data.frequency business_day: {values[k].date()} is a weekend day; use frequency: day")
        return np.busday_count(days[0], days).astype(np.int64)
    seconds = np.array([_seconds(v) for v in values])
    unit = {"hour": 3600.0, "day": 86400.0, "week": 7 * 86400.0}[frequency]
    return np.floor((seconds - seconds[0]) / unit + 1e-9).astype(np.int64)


def _seconds(value: datetime) -> float:
    """Seconds since 1970 of a time without a zone, read as UTC (not as the machine's local time, whose daylight
    saving would make an hour vanish or repeat)."""
    return (value - EPOCH).total_seconds()


def advance(value: datetime | int, frequency: str, steps: int) -> datetime | int:
    """The time ``steps`` steps after ``value``. Months keep the day of the month, or the month's end for a time
    at its month's end (2020-01-31, 2020-02-29, 2020-03-31)."""
    if frequency == "step":
        return value + steps
    if frequency in ("month", "quarter", "year"):
        months = value.year * 12 + value.month - 1 + steps * {"month": 1, "quarter": 3, "year": 12}[frequency]
        year, month = months // 12, months % 12 + 1
        last = monthrange(year, month)[1]
        at_end = value.day == monthrange(value.year, value.month)[1]
        return value.replace(year=year, month=month, day=last if at_end else min(value.day, last))
    if frequency == "business_day":
        day = np.busday_offset(np.datetime64(value.date()), steps, roll="forward")
        return datetime.combine(day.astype(datetime), value.time())
    return value + timedelta(hours=steps) if frequency == "hour" else \
        value + timedelta(days=steps * (7 if frequency == "week" else 1))


def calendar_features(values: list, names: list[str]) -> np.ndarray:
    """(rows, 2 * len(names)) float32: sine and cosine of each calendar position (month of the year, ...), so that
    December sits next to January."""
    if not names:
        return np.zeros((len(values), 0), dtype=np.float32)
    cols = []
    for name in names:
        pos, period = {
            "month": ([v.month - 1 for v in values], 12), "quarter": ([(v.month - 1) // 3 for v in values], 4),
            "day_of_week": ([v.weekday() for v in values], 7), "day_of_month": ([v.day - 1 for v in values], 31),
            "day_of_year": ([v.timetuple().tm_yday - 1 for v in values], 366), "hour": ([v.hour for v in values], 24),
        }[name]
        angle = 2 * math.pi * np.asarray(pos, dtype=np.float64) / period
        cols += [np.sin(angle), np.cos(angle)]
    return np.stack(cols, axis=1).astype(np.float32)


# ---- target transforms ---------------------------------------------------------------------------------


def transform_steps(name: str) -> tuple[str, ...]:
    return TRANSFORMS[name]


def dropped(steps: tuple[str, ...], season: int) -> int:
    """How many first values a transform leaves undefined (a difference needs the value before)."""
    return sum(1 if s == "diff" else season if s == "seasonal_diff" else 0 for s in steps)


def stages(y: np.ndarray, steps: tuple[str, ...], season: int) -> list[np.ndarray]:
    """The series after each step: [y, step 1 of y, step 2 of that, ...]; NaN where a step is undefined."""
    out = [np.asarray(y, dtype=np.float64)]
    for s in steps:
        v = out[-1]
        if s == "log":
            nxt = np.log(v)
        else:
            lag = 1 if s == "diff" else season
            nxt = np.full_like(v, np.nan)
            nxt[lag:] = v[lag:] - v[:-lag]
        out.append(nxt)
    return out


def invert(levels: list[np.ndarray], steps: tuple[str, ...], season: int, origins: np.ndarray,
           z: np.ndarray) -> np.ndarray:
    """Forecasts ``z`` (n, horizon) of the transformed series made at ``origins`` (the index of each window's last
    observed step) back in the series' units, each from its own history (``levels``: :func:`stages` of the
    observed series)."""
    out = np.asarray(z, dtype=np.float64)
    horizon = out.shape[1]
    for k in range(len(steps) - 1, -1, -1):
        s, hist = steps[k], levels[k]
        if s == "log":
            out = np.exp(np.minimum(out, 700.0))  # exp of more than 709 overflows float64
        elif s == "diff":
            out = hist[origins][:, None] + np.cumsum(out, axis=1)
        else:
            prev = np.empty_like(out)
            for h in range(horizon):
                back = h - season  # the same season one period earlier: observed, or forecast just before
                prev[:, h] = hist[origins + 1 + back] if back < 0 else out[:, back] + prev[:, back]
            out = out + prev
    return out


def check_transform(y: np.ndarray, steps: tuple[str, ...], where: list[str], name: str) -> None:
    """A log needs positive values: say which row is not."""
    if "log" in steps and (y <= 0).any():
        k = int(np.flatnonzero(y <= 0)[0])
        raise DataError(f"data.target_transform {name}: takes the log of {where[k]}'s value {y[k]:g}, which is not "
                        "positive; use diff or none")
