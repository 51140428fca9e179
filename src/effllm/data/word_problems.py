"""Multi-step word problems from templates: a second synthetic fine-tuning set, offline.

It stands in for the paper's second fine-tuning set (Medical-o1, table 8), which cannot be
downloaded at run time. It tests a different skill from the column arithmetic: read a short
story, pick out its quantities and chain two or three operations on them. The completion has the
same frame as the arithmetic set, one operation per step and the answer after the marker::

    Q: Ruth buys 7 boxes of 9 figs and 15 loose figs, then gives away 12 figs. How many figs
       does Ruth keep?
    A: 7*9=63; 63+15=78; 78-12=66
    #### 66

A problem is identified by its template and numbers (:func:`draw` returns that key): the names
and items only dress it, so a test problem never shares its arithmetic with a training problem.
"""

from __future__ import annotations

import functools
import operator
import random
from dataclasses import dataclass
from typing import Callable

NAMES = ("Adam", "Sarah", "David", "Ruth", "Jacob", "Leah", "Aaron", "Mary", "Noah", "Esther")
ITEMS = ("figs", "loaves", "lambs", "stones", "jars", "apples", "olives", "cakes")
MULTIPLIERS = range(2, 10)  # one-digit factors and divisors
_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}


@dataclass(frozen=True)
class Template:
    """A story with numbered slots and the operations that solve it.

    ``numbers(max_number)`` lists every admissible number tuple (so the problem space is exact);
    ``plan`` gives the steps as (left, op, right) with ``None`` for the previous step's result.
    """

    text: str
    numbers: Callable[[int], list[tuple[int, ...]]]
    plan: Callable[..., list[tuple[int | None, str, int | None]]]


def _span(low: int, high: int) -> range:
    return range(low, high + 1)


TEMPLATES: dict[str, Template] = {
    "baskets": Template(
        "{name} has {a} {item}. {name} gets {b} baskets of {c} {item} each. "
        "How many {item} does {name} have now?",
        lambda n: [(a, b, c) for a in _span(1, n) for b in MULTIPLIERS for c in MULTIPLIERS],
        lambda a, b, c: [(b, "*", c), (a, "+", None)],
    ),
    "share": Template(  # a = quotient * c + b, so the division is exact
        "{name} has {a} {item} and gives {b} away. {name} shares the rest equally among {c} "
        "friends. How many {item} does each friend get?",
        lambda n: [(q * c + b, b, c) for q in _span(1, n) for b in _span(1, n)
                   for c in MULTIPLIERS],
        lambda a, b, c: [(a, "-", b), (None, "/", c)],
    ),
    "market": Template(
        "{name} sells {a} {item} in the morning and {b} times as many in the evening. "
        "How many {item} does {name} sell that day?",
        lambda n: [(a, b) for a in _span(2, n) for b in MULTIPLIERS],
        lambda a, b: [(a, "*", b), (a, "+", None)],
    ),
    "shop": Template(
        "{name} has {a} coins and buys {b} {item} at {c} coins each. "
        "How many coins are left?",
        lambda n: [(b * c + extra, b, c) for b in MULTIPLIERS for c in MULTIPLIERS
                   for extra in _span(0, n)],
        lambda a, b, c: [(b, "*", c), (a, "-", None)],
    ),
    "harvest": Template(
        "{name} picks {a} {item} a day for {b} days and then eats {c} of them. "
        "How many {item} are left?",
        lambda n: [(a, b, c) for a in _span(2, n) for b in MULTIPLIERS
                   for c in _span(1, min(n, a * b - 1))],
        lambda a, b, c: [(a, "*", b), (None, "-", c)],
    ),
    "together": Template(
        "{name} has {a} {item}. {other} has {b} more {item} than {name}. "
        "How many {item} do they have together?",
        lambda n: [(a, b) for a in _span(1, n) for b in _span(1, n)],
        lambda a, b: [(a, "+", b), (a, "+", None)],
    ),
    "boxes": Template(  # three steps
        "{name} buys {a} boxes of {b} {item} and {c} loose {item}, then gives away {d} {item}. "
        "How many {item} does {name} keep?",
        lambda n: [(a, b, c, d) for a in MULTIPLIERS for b in MULTIPLIERS for c in _span(1, n)
                   for d in _span(1, min(n, a * b + c - 1))],
        lambda a, b, c, d: [(a, "*", b), (None, "+", c), (None, "-", d)],
    ),
}


def solve(template: str, numbers: tuple[int, ...]) -> tuple[list[str], int]:
    """The worked steps (``"7*9=63"``) and the answer of one problem."""
    steps, result = [], None
    for left, op, right in TEMPLATES[template].plan(*numbers):
        left, right = (result if left is None else left), (result if right is None else right)
        result = _APPLY[op](left, right)
        steps.append(f"{left}{op}{right}={result}")
    return steps, result


@functools.lru_cache(maxsize=None)
def numbers(template: str, max_number: int) -> tuple[tuple[int, ...], ...]:
    """Every number tuple of ``template`` (cached: drawing indexes it once per problem)."""
    return tuple(TEMPLATES[template].numbers(max_number))


def capacity(templates: list[str], max_number: int) -> int:
    """Distinct problems (template and numbers) the templates give up to ``max_number``."""
    return sum(len(numbers(t, max_number)) for t in templates)


def draw(rng: random.Random, templates: list[str], max_number: int) -> dict:
    """One problem ``{"text", "steps", "answer", "key"}``: a template and its numbers uniformly
    (within the template), then a name and an item to dress it."""
    template = rng.choice(templates)
    values = rng.choice(numbers(template, max_number))
    name, other = rng.sample(NAMES, 2)
    slots = dict(zip("abcd", values), name=name, other=other, item=rng.choice(ITEMS))
    steps, answer = solve(template, values)
    return {"text": TEMPLATES[template].text.format(**slots), "steps": steps,
            "answer": str(answer), "key": (template, *values)}
