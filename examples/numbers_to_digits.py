"""Writes the data of examples/numbers_to_digits.yaml: English number words and their digits, one
``words<TAB>digits`` pair per line, for every number below 100,000 in a fixed shuffled order (seed 0).

    python examples/numbers_to_digits.py data/numbers.tsv [--count 30000]

"four hundred twelve thousand" style words (American, no "and"); the same seed always writes the same file.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def below_thousand(n: int) -> list[str]:
    words = []
    if n >= 100:
        words += [ONES[n // 100], "hundred"]
        n %= 100
    if n >= 20:
        words.append(TENS[n // 10] + (f"-{ONES[n % 10]}" if n % 10 else ""))
    elif n or not words:
        words.append(ONES[n])
    return words


def spell(n: int) -> str:
    """0 <= n < 1,000,000 in words: 40512 -> 'forty thousand five hundred twelve'."""
    thousands, rest = divmod(n, 1000)
    words = below_thousand(thousands) + ["thousand"] if thousands else []
    if rest or not words:
        words += below_thousand(rest)
    return " ".join(words)


def pairs(count: int, seed: int = 0, limit: int = 100_000) -> list[tuple[str, str]]:
    numbers = random.Random(seed).sample(range(limit), count)
    return [(spell(n), str(n)) for n in numbers]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="TSV file to write")
    p.add_argument("--count", type=int, default=30_000, help="pairs (distinct numbers; default 30,000)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(f"{w}\t{d}\n" for w, d in pairs(args.count, args.seed)), encoding="utf-8")
    print(f"wrote {args.count:,} pairs to {args.out}")


if __name__ == "__main__":
    main()
