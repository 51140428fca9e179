"""A byte-level BPE tokenizer trained on the corpus train split, and token arrays of every split."""

from __future__ import annotations

import importlib.metadata
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from effllm.data.splits import SPLITS, read_split
from effllm.io import atomic_dir, sha256_file, write_json
from effllm.specs import TokenizerSpec

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"


def _train_bpe(texts: list[str], vocab_size: int, min_frequency: int,
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
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
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
    eos = tokenizer.eos_token_id
    encodings = plain_backend(tokenizer).encode_batch(texts, add_special_tokens=False)
    ids = [token for encoding in encodings for token in (*encoding.ids, eos)]
    return np.asarray(ids, dtype=dtype)


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


def build_tokenizer(
    corpus_dir: str | os.PathLike, settings: TokenizerSpec | dict, out_dir: str | os.PathLike
) -> dict:
    """Train on the train split only (no held-out leakage); write all splits' tokens atomically.
    ``settings``: the spec of ``data.tokenizer``, or that config dict."""
    settings = TokenizerSpec.of(settings, "data.tokenizer").filled()
    corpus_dir = Path(corpus_dir)
    documents = {split: [doc["text"] for doc in read_split(corpus_dir, split)] for split in SPLITS}
    started = time.perf_counter()
    bpe = _train_bpe(documents["train"], settings.vocab_size, settings.min_frequency,
                     settings.split_digits)
    tokenizer = _wrap(bpe)
    training_seconds = time.perf_counter() - started
    vocab_size = len(tokenizer)
    dtype = np.uint16 if vocab_size - 1 <= np.iinfo(np.uint16).max else np.int32

    splits = {}
    with atomic_dir(out_dir) as tmp:
        save_tokenizer(tokenizer, tmp / "tokenizer")
        for split, texts in documents.items():
            tokens = encode_documents(tokenizer, texts, dtype)
            np.save(tmp / f"{split}.npy", tokens)
            characters = sum(len(text) for text in texts)
            splits[split] = {
                "file": f"{split}.npy",
                "documents": len(texts),
                "tokens": int(tokens.size),
                "characters": characters,
                "chars_per_token": round(characters / max(tokens.size, 1), 4),
                "sha256": sha256_file(tmp / f"{split}.npy"),
            }
        card = {
            "corpus_card_sha256": sha256_file(corpus_dir / "card.json"),
            "vocab_size": vocab_size,
            "requested_vocab_size": settings.vocab_size,
            "min_frequency": settings.min_frequency,
            "split_digits": settings.split_digits,
            "model": "byte-level BPE",
            "tokenizers_version": importlib.metadata.version("tokenizers"),
            "special_tokens": {
                "eos": [EOS_TOKEN, tokenizer.eos_token_id],
                "bos": [EOS_TOKEN, tokenizer.bos_token_id],
                "pad": [PAD_TOKEN, tokenizer.pad_token_id],
            },
            "dtype": np.dtype(dtype).name,
            "tokenizer_json_sha256": sha256_file(tmp / "tokenizer" / "tokenizer.json"),
            "training_seconds": round(training_seconds, 3),
            "splits": splits,
        }
        write_json(tmp / "card.json", card)
    return card
