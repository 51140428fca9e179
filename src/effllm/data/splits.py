"""Train/validation/test assignment and storage shared by the corpus and the reasoning set."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from effllm.io import sha256_file

SPLITS = ("train", "validation", "test")


def seeded_order(keys: Iterable[str], seed: int) -> list[str]:
    """Sort keys by a seeded hash: a reproducible shuffle that ignores the input order."""
    return sorted(keys, key=lambda key: hashlib.sha256(f"{seed}\0{key}".encode()).hexdigest())


def check_fractions(validation_fraction: float, test_fraction: float, where: str) -> None:
    if validation_fraction <= 0 or test_fraction <= 0 or validation_fraction + test_fraction >= 1:
        raise ValueError(
            f"{where}.validation_fraction and {where}.test_fraction must be > 0 with a sum < 1, "
            f"got {validation_fraction} and {test_fraction}"
        )


def assign_splits(
    sizes: Mapping[str, int],
    validation_fraction: float,
    test_fraction: float,
    seed: int,
    where: str = "data.split",
) -> dict[str, str]:
    """Map each unit to a split: test, then validation, take whole units up to their share of size.

    Units are visited in seeded-hash order (so a unit's split does not depend on load order) and
    taken while they still fit under the target, keeping held-out shares close to the fractions.
    A held-out split that nothing fits into takes the smallest remaining unit, so it is never empty;
    train must keep at least one unit.
    """
    check_fractions(validation_fraction, test_fraction, where)
    remaining = seeded_order(sizes, seed)
    total = sum(sizes.values())
    assignment: dict[str, str] = {}
    for split, fraction in (("test", test_fraction), ("validation", validation_fraction)):
        filled, taken = 0, []
        for key in remaining:
            if filled + sizes[key] <= fraction * total:
                taken.append(key)
                filled += sizes[key]
        if not taken and remaining:
            taken = [min(remaining, key=lambda key: sizes[key])]
        assignment.update(dict.fromkeys(taken, split))
        remaining = [key for key in remaining if key not in assignment]
    if not remaining:
        raise ValueError(
            f"{len(sizes)} split unit(s) are too few for {where}: train, validation and test each "
            "need at least one"
        )
    assignment.update(dict.fromkeys(remaining, "train"))
    return assignment


def hashed_split(key: str, seed: int, validation_fraction: float, test_fraction: float) -> str:
    """The split of one unit from a seeded hash alone: a streamed corpus is split as it is read,
    without a global pass, and a unit keeps its split however much of the source is read. The
    held-out shares hold in expectation, by unit count (not by characters)."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    where = int.from_bytes(digest[:8], "big") / 2**64
    if where < test_fraction:
        return "test"
    return "validation" if where < test_fraction + validation_fraction else "train"


def write_jsonl(path: Path, rows: Iterable[dict]) -> dict:
    """Write one JSON object per line (UTF-8, keys in given order); return its name and SHA-256."""
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {"file": path.name, "sha256": sha256_file(path)}


def read_jsonl(path: str | Path) -> list[dict]:
    return list(iter_jsonl(path))


def iter_jsonl(path: str | Path) -> Iterator[dict]:
    """The rows of a JSONL file one at a time (a large split is never held whole)."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def read_split(directory: str | Path, split: str) -> list[dict]:
    """Read ``directory/{split}.jsonl`` written by ``prepare_corpus`` or ``prepare_reasoning``."""
    return list(iter_split(directory, split))


def iter_split(directory: str | Path, split: str) -> Iterator[dict]:
    """:func:`read_split`, one row at a time."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return iter_jsonl(Path(directory) / f"{split}.jsonl")
