"""The tokenizer stage: a byte-level BPE trained on a bounded sample of the corpus's train split
(or a cached hub model's tokenizer), and a token file per split.

Documents are encoded in batches (``encode_batch`` runs in parallel in Rust) and appended to
``{split}.npy`` as they come, up to the split's token budget, so no split is ever held in memory;
readers open the files with ``np.load(path, mmap_mode="r")``.
"""

from __future__ import annotations

import importlib.metadata
import io
import itertools
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from effllm.data.splits import SPLITS, iter_split
from effllm.io import atomic_dir, sha256_file, write_json
from effllm.specs import CorpusSpec, SplitSpec, TokenizerSpec

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"


def _train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int,
               split_digits: bool = True) -> Tokenizer:
    """Byte-level BPE over the full byte alphabet, so any string (digits, symbols) round-trips.

    With ``split_digits`` every digit is its own token, as in the Llama and Qwen2 tokenizers:
    numbers then share one consistent representation, which column arithmetic needs.

    Training is deterministic: tokenizers 0.23.3 wrote byte-identical tokenizer.json files across
    runs and with RAYON_NUM_THREADS=1, 2 and 4 (tests/test_data.py checks repeat runs).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits else byte_level
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _wrap(tokenizer_object: Tokenizer) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Load the tokenizer saved by ``build_tokenizer`` (its ``tokenizer`` directory), offline."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)


def plain_backend(tokenizer: PreTrainedTokenizerFast) -> Tokenizer:
    """A copy of the backend tokenizer with padding and truncation off.

    A batched ``tokenizer(..., padding=True)`` call switches padding on in the backend and leaves
    it there; a tokenizer saved afterwards carries it in ``tokenizer.json``. Documents encoded
    through such a backend come back padded to the longest one (issue 16: 54 % pad ids).
    """
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_padding()
    backend.no_truncation()
    return backend


def encode_documents(
    tokenizer: PreTrainedTokenizerFast, texts: list[str], dtype: type
) -> np.ndarray:
    """Token ids of the documents back to back, each followed by the end-of-text id; never
    padded or truncated, whatever state the tokenizer was saved in."""
    return _encode(plain_backend(tokenizer), tokenizer.eos_token_id, texts, dtype)[0]


def _encode(backend: Tokenizer, eos: int, texts: list[str], dtype) -> tuple[np.ndarray,
                                                                            np.ndarray]:
    """The documents' ids back to back, each closed by ``eos``, and where each document ends."""
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    ids: list[int] = []
    ends = np.empty(len(encodings), dtype=np.int64)
    for i, encoding in enumerate(encodings):
        ids.extend(encoding.ids)
        ids.append(eos)
        ends[i] = len(ids)
    return np.asarray(ids, dtype=dtype), ends


def encode_split(tokenizer: PreTrainedTokenizerFast, corpus_dir: str | os.PathLike,
                 split: str, max_tokens: int | None = None, batch: int = 256) -> np.ndarray:
    """A corpus split in ``tokenizer``'s ids (as :func:`encode_documents`), reading and
    encoding whole documents in order only until ``max_tokens`` (None: all) are reached."""
    backend, eos = plain_backend(tokenizer), tokenizer.eos_token_id
    documents = (doc["text"] for doc in iter_split(corpus_dir, split))
    parts, count = [], 0
    while max_tokens is None or count < max_tokens:
        texts = list(itertools.islice(documents, batch))
        if not texts:
            break
        ids, ends = _encode(backend, eos, texts, np.int64)
        if max_tokens is not None and count + ids.size > max_tokens:  # up to the document
            ids = ids[:ends[np.searchsorted(ends, max_tokens - count)]]  # that reaches it
        parts.append(ids)
        count += ids.size
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def pipeline_tokens(tokenizer: PreTrainedTokenizerFast, tokens_dir: str | os.PathLike,
                    split: str) -> np.ndarray | None:
    """The tokenizer stage's ``{split}.npy``, memory-mapped, when ``tokenizer`` is that stage's
    tokenizer (same vocabulary, merges and special tokens; padding state aside); else None."""
    from tokenizers import Tokenizer

    tokens_dir = Path(tokens_dir)
    saved = tokens_dir / "tokenizer" / "tokenizer.json"
    if not saved.is_file() or not (tokens_dir / f"{split}.npy").is_file():
        return None
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        return None
    ours = Tokenizer.from_file(str(saved))
    ours.no_padding()
    ours.no_truncation()
    if plain_backend(tokenizer).to_str() != ours.to_str():
        return None
    return np.load(tokens_dir / f"{split}.npy", mmap_mode="r")


def with_pad_token(tokenizer: PreTrainedTokenizerFast, where) -> PreTrainedTokenizerFast:
    """The tokenizer with a pad token: hub tokenizers (Llama's) often have none, and batched
    generation needs one. Padding is always masked, so the end-of-text token serves."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer of {where} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | os.PathLike) -> None:
    """Save without the padding or truncation state an evaluation left in the backend: padding is
    asked for per call, where batched generation needs it."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.no_padding()
        backend.no_truncation()
    tokenizer.save_pretrained(str(directory))


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits, else uint32 (readers cast each batch to int64)."""
    return np.dtype(np.uint16 if vocab_size - 1 <= np.iinfo(np.uint16).max else np.uint32)


def _npy_header(dtype: np.dtype, length: int) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        out, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
              "shape": (length,)})
    return out.getvalue()


class TokenFile:
    """A 1-D ``.npy`` of token ids written front to back, up to ``budget`` ids (None: no limit).

    The header is written first for the largest length and rewritten with the real one at the
    end (numpy pads a 1-D header to 128 bytes whatever the length), so the file is the one
    ``np.save`` writes and the ids never sit in memory together.
    """

    def __init__(self, path: Path, dtype: np.dtype, budget: int | None):
        self.path, self.dtype, self.budget = path, dtype, budget
        self.tokens = self.documents = self.characters = 0
        self.truncated = False
        self._handle = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._header = self._handle.write(_npy_header(dtype, 2**62))

    @property
    def full(self) -> bool:
        return self.budget is not None and self.tokens >= self.budget

    def add(self, ids: np.ndarray, ends: np.ndarray, texts: list[str]) -> None:
        """Append encoded documents (``ends``: where each one ends in ``ids``), cutting the last
        one that does not fit the budget."""
        keep = ids.size if self.budget is None else min(ids.size, self.budget - self.tokens)
        if keep <= 0:
            return
        touched = int(np.searchsorted(ends, keep)) + 1  # documents with an id kept
        self.truncated = bool(keep != ends[touched - 1])
        self._handle.write(ids[:keep].tobytes())
        self.tokens += keep
        self.documents += touched
        self.characters += sum(len(text) for text in texts[:touched])

    def close(self) -> None:
        header = _npy_header(self.dtype, self.tokens)
        if len(header) != self._header:
            raise RuntimeError(f"npy header of {self.path} changed length")  # numpy's format
        self._handle.seek(0)
        self._handle.write(header)
        self._handle.close()


def _tokenizer_sample(corpus_dir: Path, limit: int | None, seen: dict) -> Iterator[str]:
    """The first ``limit`` train documents (None: all), counted into ``seen`` as they pass."""
    for doc in itertools.islice(iter_split(corpus_dir, "train"), limit):
        seen["documents"] += 1
        seen["characters"] += len(doc["text"])
        yield doc["text"]


def _hub_tokenizer(hub: Mapping) -> PreTrainedTokenizerFast:
    from transformers import AutoTokenizer

    from effllm.data.hub import cached_tokenizer

    snapshot = cached_tokenizer(hub["repo_id"], hub.get("revision"))
    tokenizer = AutoTokenizer.from_pretrained(str(snapshot), local_files_only=True)
    if not tokenizer.is_fast:
        raise ValueError(f"data.tokenizer.hub: the tokenizer of {hub['repo_id']!r} has no fast "
                         "(Rust) version; the data stage encodes with one")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"data.tokenizer.hub: the tokenizer of {hub['repo_id']!r} has no "
                         "end-of-text token to separate documents")
    return with_pad_token(tokenizer, hub["repo_id"])


def _documents(corpus_dir: Path, stream) -> Iterator[tuple[str, dict]]:
    """``(split, document)`` in reading order: a streamed source's stream, or the corpus
    stage's JSONL files one after another."""
    if stream is not None:
        yield from stream
        return
    for split in SPLITS:
        for doc in iter_split(corpus_dir, split):
            yield split, doc


def _fill(documents: Iterable[tuple[str, dict]], backend: Tokenizer, eos: int,
          files: dict[str, TokenFile], batch_characters: int) -> None:
    """Encode documents in per-split batches of about ``batch_characters`` and append them to
    their split's file; stop reading once every file holds its budget. A batch is cut early
    once it likely holds the rest of its split's budget (English runs about 4 characters a
    token), so a small held-out budget does not keep the stream going for a full batch."""
    pending: dict[str, list[str]] = {split: [] for split in files}
    size = dict.fromkeys(files, 0)

    def flush(split: str) -> None:
        texts = pending[split]
        if texts and not files[split].full:
            ids, ends = _encode(backend, eos, texts, files[split].dtype)
            files[split].add(ids, ends, texts)
        pending[split], size[split] = [], 0

    def due(split: str) -> bool:
        file = files[split]
        if file.budget is None:
            return size[split] >= batch_characters
        return size[split] >= min(batch_characters, 4 * (file.budget - file.tokens))

    for split, doc in documents:
        if files[split].full:
            if all(f.full for f in files.values()):
                break
            continue
        pending[split].append(doc["text"])
        size[split] += len(doc["text"])
        if due(split):
            flush(split)
    for split in files:
        flush(split)


def build_tokenizer(
    corpus_dir: str | os.PathLike, settings: TokenizerSpec | dict, out_dir: str | os.PathLike,
    budget: Mapping[str, int | None] | None = None, corpus: CorpusSpec | dict | None = None,
    split_spec: SplitSpec | dict | None = None, seed: int = 0, hub: Mapping | None = None,
    batch_characters: int = 1 << 18,
) -> dict:
    """Train on the train split only (no held-out leakage), on its first
    ``settings.sample_documents`` documents, or take ``hub``'s tokenizer (``{repo_id,
    revision}``); then write each split's tokens, at most ``budget[split]`` (None: all),
    atomically. A streamed ``corpus`` (with ``split_spec`` and ``seed``) is read again from its
    source, past the corpus stage's sample, until every budget is filled; other corpora are read
    from the corpus stage's JSONL files. ``settings``: the spec of ``data.tokenizer``."""
    from effllm.data.corpus import CorpusStream, streamed

    settings = TokenizerSpec.of(settings, "data.tokenizer").filled()
    budget = {split: (budget or {}).get(split) for split in SPLITS}
    corpus_dir = Path(corpus_dir)
    started = time.perf_counter()
    sample = {"documents": 0, "characters": 0}
    if hub:
        tokenizer = _hub_tokenizer(hub)
        model = {"model": "hub tokenizer", "repo_id": hub["repo_id"],
                 "revision": hub.get("revision")}
    else:
        bpe = _train_bpe(_tokenizer_sample(corpus_dir, settings.sample_documents, sample),
                         settings.vocab_size, settings.min_frequency, settings.split_digits)
        tokenizer = _wrap(bpe)
        model = {"model": "byte-level BPE", "sample_documents": settings.sample_documents,
                 "sample": sample}
    training_seconds = time.perf_counter() - started
    vocab_size = len(tokenizer)
    dtype = token_dtype(max(vocab_size, max(tokenizer.get_vocab().values()) + 1))
    stream = (CorpusStream(corpus, split_spec, seed)
              if corpus is not None and streamed(corpus) else None)

    splits = {}
    with atomic_dir(out_dir) as tmp:
        save_tokenizer(tokenizer, tmp / "tokenizer")
        files = {split: TokenFile(tmp / f"{split}.npy", dtype, budget[split]) for split in SPLITS}
        started = time.perf_counter()
        try:
            _fill(_documents(corpus_dir, stream), plain_backend(tokenizer),
                  tokenizer.eos_token_id, files, batch_characters)
        finally:
            for file in files.values():
                file.close()
        encoding_seconds = time.perf_counter() - started
        if stream is not None and stream.ended is None:
            stream.ended = "budgets_filled"
        for split, file in files.items():
            splits[split] = {
                "file": f"{split}.npy",
                "documents": file.documents,
                "tokens": file.tokens,
                "characters": file.characters,
                "chars_per_token": round(file.characters / max(file.tokens, 1), 4),
                "sha256": sha256_file(file.path),
                "budget": file.budget,
                "budget_filled": file.full if file.budget is not None else None,
                "last_document_cut": file.truncated,
            }
        card = {
            "corpus_card_sha256": sha256_file(corpus_dir / "card.json"),
            "vocab_size": vocab_size,
            "requested_vocab_size": settings.vocab_size,
            "min_frequency": settings.min_frequency,
            "split_digits": settings.split_digits,
            **model,
            "tokenizers_version": importlib.metadata.version("tokenizers"),
            "special_tokens": {
                "eos": [tokenizer.eos_token, tokenizer.eos_token_id],
                "bos": [tokenizer.bos_token, tokenizer.bos_token_id],
                "pad": [tokenizer.pad_token, tokenizer.pad_token_id],
            },
            "dtype": dtype.name,
            "tokenizer_json_sha256": sha256_file(tmp / "tokenizer" / "tokenizer.json"),
            "training_seconds": round(training_seconds, 3),
            "encoding_seconds": round(encoding_seconds, 3),
            "read": stream.card() if stream is not None else {"from": "corpus JSONL splits"},
            "splits": splits,
        }
        write_json(tmp / "card.json", card)
    return card
