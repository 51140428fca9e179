"""Verifiable step-by-step fine-tuning sets: column arithmetic, template word problems
(:mod:`effllm.data.word_problems`) or a cached Hub SFT set, each built by :func:`prepare_reasoning`.

Arithmetic stands in for the paper's O1-SFT offline. A completion is a worked scratchpad, one
column per step from the ones digit up, with carries written out (``+1``) and borrows too (the
digit that borrows shows the lent ten, ``12-7``; the next column pays it back, ``-1``), then the
answer after a fixed marker::

    Q: 347+85=?            A: 7+5=12; 4+8+1=13; 3+0+1=4
    Q: 532-187=?           A: 12-7=5; 13-8-1=4; 5-1-1=3
    Q: 347*6=?             A: 7*6=42; 4*6+4=28; 3*6+2=20

Each step's last digit is an answer digit and the last step is written in full, so the answer is the
last step followed by the earlier steps' last digits in reverse (432, 345, 2082).
"""

from __future__ import annotations

import operator
import os
import random
from pathlib import Path

from effllm.data import hub
from effllm.data.splits import SPLITS, assign_splits, write_jsonl
from effllm.io import atomic_dir, write_json
from effllm.specs import (ArithmeticSource, HfSetSource, ReasoningSetSpec, SyntheticSet,
                          WordProblemsSource)

ANSWER_MARKER = "####"
OPERATIONS = {"add": "+", "sub": "-", "mul": "*"}


# ------------------------------------------------------------------------------------- scratchpads


def _digits(value: int, width: int) -> list[int]:
    """Digits from the ones place up, padded with zeros to ``width``."""
    return [int(char) for char in reversed(str(value).zfill(width))]


def _add_steps(a: int, b: int) -> list[str]:
    width = len(str(max(a, b)))
    steps, carry = [], 0
    for x, y in zip(_digits(a, width), _digits(b, width)):
        total = x + y + carry
        steps.append(f"{x}+{y}{'+1' if carry else ''}={total}")
        carry = total // 10
    return steps


def _sub_steps(a: int, b: int) -> list[str]:
    width = len(str(a))
    steps, borrow = [], 0
    for x, y in zip(_digits(a, width), _digits(b, width)):
        lend = 10 if x - y - borrow < 0 else 0
        steps.append(f"{x + lend}-{y}{'-1' if borrow else ''}={x + lend - y - borrow}")
        borrow = lend // 10
    return steps


def _mul_steps(a: int, b: int) -> list[str]:
    steps, carry = [], 0
    for x in _digits(a, len(str(a))):
        total = x * b + carry
        steps.append(f"{x}*{b}{f'+{carry}' if carry else ''}={total}")
        carry = total // 10
    return steps


def _operands(rng: random.Random, op: str, n_digits: int) -> tuple[int, int]:
    """Operands whose larger one has exactly ``n_digits`` digits (``mul``: times one digit 2-9).

    Subtraction and multiplication put the larger operand first (results are never negative and the
    one-digit factor comes last); addition uses both orders.
    """
    low, high = 10 ** (n_digits - 1), 10**n_digits - 1
    if op == "mul":
        a, b = rng.randint(max(low, 2), high), rng.randint(2, 9)
        return max(a, b), min(a, b)
    a, b = rng.randint(low, high), rng.randint(1, high)
    if op == "sub" or rng.random() < 0.5:
        a, b = max(a, b), min(a, b)
    else:
        a, b = min(a, b), max(a, b)
    return a, b


_STEPS = {"add": _add_steps, "sub": _sub_steps, "mul": _mul_steps}
_RESULT = {"add": operator.add, "sub": operator.sub, "mul": operator.mul}


def make_problem(rng: random.Random, op: str, n_digits: int) -> dict:
    """One problem ``{"prompt", "completion", "answer"}``; the completion has no end-of-text."""
    if op not in OPERATIONS:
        raise ValueError(f"unknown operation {op!r}; expected one of {sorted(OPERATIONS)}")
    if n_digits < 1:
        raise ValueError(f"n_digits must be >= 1, got {n_digits}")
    a, b = _operands(rng, op, n_digits)
    answer = str(_RESULT[op](a, b))
    return {
        "prompt": f"Q: {a}{OPERATIONS[op]}{b}=?\nA:",
        "completion": f" {'; '.join(_STEPS[op](a, b))}\n{ANSWER_MARKER} {answer}",
        "answer": answer,
    }


def extract_answer(text: str) -> str | None:
    """The stripped text after the last answer marker up to the end of its line, or None.

    The last marker counts because long responses (markdown "#### headings") may use it earlier;
    text on later lines, such as a new "Q:" a model runs on into, is ignored.
    """
    _, marker, rest = text.rpartition(ANSWER_MARKER)
    if not marker:
        return None
    answer = rest.split("\n", 1)[0].strip()
    return answer or None


def exact_match(generated_text: str, answer: str) -> bool:
    """True when the answer extracted from generated text equals the reference answer exactly."""
    extracted = extract_answer(generated_text)
    return extracted is not None and extracted == str(answer).strip()


# --------------------------------------------------------------------------------------- data sets


def _problem_key(problem: dict) -> str:
    """Identity of a problem: a+b and b+a are one, so a test sum never appears swapped in train."""
    expression = problem["prompt"].removeprefix("Q: ").split("=", 1)[0]
    if "+" in expression:
        return "+".join(sorted(expression.split("+"), key=int))
    return expression


def _capacity(operations: list[str], min_digits: int, max_digits: int) -> int:
    """Number of distinct problems (by ``_problem_key``) that ``_operands`` can produce."""
    total = 0
    for n in range(min_digits, max_digits + 1):
        low, high = 10 ** (n - 1), 10**n - 1
        for op in operations:
            if op == "mul":  # a >= b >= 2, a of n digits, b of one digit
                total += 8 * 9 // 2 if n == 1 else 8 * (high - low + 1)
            else:  # unordered pairs a >= b >= 1 with a of n digits
                total += (low + high) * (high - low + 1) // 2
    return total


def _unique_splits(draw, counts: dict[str, int], seed: int) -> list[dict]:
    """``sum(counts)`` problems with distinct keys from one seeded stream, split in the order of
    ``counts`` (test first, so that growing the training set never changes the test set)."""
    rng = random.Random(seed)
    seen: set = set()
    problems: list[dict] = []
    while len(problems) < sum(counts.values()):
        key, problem = draw(rng)
        if key not in seen:
            seen.add(key)
            problems.append(problem)
    splits, start = {}, 0
    for split, count in counts.items():
        splits[split] = problems[start : start + count]
        start += count
    return splits


def _counts(settings: SyntheticSet, capacity: int, where: str, hint: str) -> dict[str, int]:
    """Samples per split (test, validation, train), refused when the problem space is smaller."""
    counts = settings.counts()
    wanted = sum(counts.values())
    if wanted > capacity:
        raise ValueError(
            f"{where}: n_train + n_validation + n_test = {wanted} exceeds the {capacity} "
            f"distinct problems {hint}"
        )
    return counts


def _arithmetic(settings: ArithmeticSource, seed: int,
                where: str) -> tuple[dict[str, list[dict]], dict]:
    """Unique column-arithmetic problems, test first, then validation, then train."""
    operations = list(settings.operations)
    unknown = sorted(set(operations) - set(OPERATIONS))
    if not operations or unknown:
        raise ValueError(f"{where}.operations must be a non-empty subset of {sorted(OPERATIONS)}")
    low, high = settings.min_digits, settings.max_digits
    if not 1 <= low <= high:
        raise ValueError(
            f"{where}.min_digits/max_digits must satisfy 1 <= min <= max, got {low}, {high}"
        )
    capacity = _capacity(operations, low, high)
    counts = _counts(settings, capacity, where, f"of operations {operations} with {low}-{high} "
                     f"digits; raise {where}.max_digits or lower the counts")

    def draw(rng):
        problem = make_problem(rng, rng.choice(operations), rng.randint(low, high))
        return _problem_key(problem), problem

    return _unique_splits(draw, counts, seed), {"name": "arithmetic", "problem_space": capacity}


def _word_problems(settings: WordProblemsSource, seed: int,
                   where: str) -> tuple[dict[str, list[dict]], dict]:
    """Unique template word problems (by template and numbers), in the arithmetic set's frame."""
    from effllm.data import word_problems

    templates = list(settings.templates or word_problems.TEMPLATES)
    unknown = sorted(set(templates) - set(word_problems.TEMPLATES))
    if unknown:
        raise ValueError(f"{where}.templates: unknown {unknown}; known: "
                         f"{sorted(word_problems.TEMPLATES)}")
    largest = settings.max_number
    capacity = word_problems.capacity(templates, largest)
    counts = _counts(settings, capacity, where, f"of templates {templates} with numbers up to "
                     f"{largest}; raise {where}.max_number or lower the counts")

    def draw(rng):
        made = word_problems.draw(rng, templates, largest)
        return made["key"], {
            "prompt": f"Q: {made['text']}\nA:",
            "completion": f" {'; '.join(made['steps'])}\n{ANSWER_MARKER} {made['answer']}",
            "answer": made["answer"],
        }

    splits = _unique_splits(draw, counts, seed)
    return splits, {"name": "word_problems", "templates": templates, "problem_space": capacity}


def _hf(settings: HfSetSource, seed: int, where: str) -> tuple[dict[str, list[dict]], dict]:
    """Prompt/response pairs from a cached data set, split by prompt (repeated prompts dropped).

    Prompts get the synthetic sets' ``Q: ...\nA:`` frame. Several response fields (Medical-o1's
    reasoning ``Complex_CoT`` and its ``Response``) are joined by a blank line, in order. A known
    answer is appended after the marker unless the response's last marker already gives it, so
    ``extract_answer`` finds it.
    """
    dataset = hub.cached_dataset(settings.repo_id, settings.files, settings.cache_dir)
    answer_field = settings.answer_field
    responses = settings.response_field
    responses = [responses] if isinstance(responses, str) else list(responses)
    fields = [settings.prompt_field, *responses] + ([answer_field] if answer_field else [])
    samples: dict[str, dict] = {}
    for _, record in hub.iter_records(dataset, fields, settings.max_samples):
        prompt = f"Q: {str(record[settings.prompt_field]).strip()}\nA:"
        completion = " " + "\n\n".join(str(record[field]).strip() for field in responses
                                        if record[field] is not None)
        answer = record[answer_field] if answer_field else None
        answer = None if answer is None else str(answer).strip()
        if answer is not None and extract_answer(completion) != answer:
            completion += f"\n{ANSWER_MARKER} {answer}"
        samples.setdefault(prompt, {"prompt": prompt, "completion": completion, "answer": answer})
    assignment = assign_splits(
        dict.fromkeys(samples, 1), settings.validation_fraction, settings.test_fraction, seed,
        where
    )
    splits = {split: [s for p, s in samples.items() if assignment[p] == split] for split in SPLITS}
    return splits, {"name": "hf", **dataset.describe()}


_SOURCES = {"arithmetic": _arithmetic, "word_problems": _word_problems, "hf": _hf}


def prepare_reasoning(reasoning: ReasoningSetSpec | dict, seed: int, out_dir: str | os.PathLike,
                      key: str = "data.reasoning") -> dict:
    """Build one fine-tuning set's splits and write them with a card, atomically; return the
    card. ``reasoning`` is the set's spec (or its config dict) and ``key`` its config key
    (``data.reasoning.<name>``), named in errors."""
    reasoning = ReasoningSetSpec.of(reasoning, key)
    source, settings = reasoning.source, reasoning.settings
    if source not in _SOURCES:
        raise ValueError(f"{key}.source must be one of {sorted(_SOURCES)}, got {source!r}")
    if settings is None:
        raise ValueError(f"{key}.{source}: needed when source is {source}")
    splits, source_info = _SOURCES[source](settings.filled(), seed, f"{key}.{source}")
    summary = {}
    with atomic_dir(out_dir) as tmp:
        for split in SPLITS:
            rows = splits[split]
            summary[split] = {
                **write_jsonl(Path(tmp) / f"{split}.jsonl", rows),
                "samples": len(rows),
                "prompt_characters": sum(len(row["prompt"]) for row in rows),
                "completion_characters": sum(len(row["completion"]) for row in rows),
                "max_completion_characters": max(
                    (len(row["completion"]) for row in rows), default=0
                ),
                "with_answer": sum(row["answer"] is not None for row in rows),
            }
        card = {"source": source_info, "seed": seed, "settings": settings.to_json(),
                "splits": summary}
        write_json(tmp / "card.json", card)
    return card
