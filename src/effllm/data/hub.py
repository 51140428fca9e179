"""Read data sets and models from the local Hugging Face cache only: nothing is downloaded at
run time."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from effllm.data import DataSourceError
from effllm.io import sha256_file

READABLE_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class CachedDataset:
    """The files of one cached data-set snapshot that match the configured patterns."""

    repo_id: str
    snapshot: Path
    files: tuple[Path, ...]

    def describe(self) -> dict:
        """Provenance for data cards: repo, snapshot commit and a SHA-256 per file read."""
        return {
            "repo_id": self.repo_id,
            "revision": self.snapshot.name,
            "files": [
                {"path": path.relative_to(self.snapshot).as_posix(), "sha256": sha256_file(path)}
                for path in self.files
            ],
        }


def _as_list(patterns: str | list[str]) -> list[str]:
    return [patterns] if isinstance(patterns, str) else list(patterns)


def _fetch_hint(repo_id: str, patterns: list[str], cache_dir: str,
                repo_type: str = "dataset") -> str:
    includes = " ".join(f"--include '{pattern}'" for pattern in patterns)
    return (
        f"The pipeline reads Hugging Face {repo_type}s only from the local cache ({cache_dir}). "
        f"On a connected machine run `hf download {repo_id} --repo-type {repo_type} {includes}` "
        "with HF_HUB_CACHE set to that cache (or copy the downloaded cache here), or choose a "
        "local source in the config."
    )


# What a model needs to load without remote code: config, safetensors weights, tokenizer files.
MODEL_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]


def cached_model(repo_id: str, revision: str | None = None,
                 cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached snapshot directory of a model, checked to load offline, from safetensors, with
    transformers' own classes; DataSourceError with fetch instructions otherwise."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = str(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE)
    hint = _fetch_hint(repo_id, MODEL_PATTERNS, cache, "model")
    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                          allow_patterns=MODEL_PATTERNS, local_files_only=True))
    except LocalEntryNotFoundError as error:
        raise DataSourceError(f"Model {repo_id!r} is not in the local Hugging Face cache: "
                              f"{error} {hint}") from error
    config = snapshot / "config.json"
    if not config.is_file():
        raise DataSourceError(f"The cached snapshot of {repo_id!r} ({snapshot}) has no "
                              f"config.json. {hint}")
    if not any(snapshot.glob("*.safetensors")):
        raise DataSourceError(f"The cached snapshot of {repo_id!r} ({snapshot}) has no "
                              f".safetensors weights; the pipeline loads safetensors only. {hint}")
    fields = json.loads(config.read_text())
    if "auto_map" in fields and not _native(fields.get("model_type")):
        raise DataSourceError(f"Model {repo_id!r} needs its own remote code (auto_map in "
                              f"config.json, model_type {fields.get('model_type')!r} unknown to "
                              "transformers); the pipeline runs with trust_remote_code off")
    return snapshot


# What a tokenizer needs to load on its own (the data stage may use a hub model's tokenizer).
TOKENIZER_PATTERNS = ["*.json", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]


def cached_tokenizer(repo_id: str, revision: str | None = None,
                     cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached snapshot folder of a model's tokenizer (weights not needed); DataSourceError
    with fetch instructions when it is not in the cache."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = str(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE)
    hint = _fetch_hint(repo_id, TOKENIZER_PATTERNS, cache, "model")
    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                          allow_patterns=TOKENIZER_PATTERNS,
                                          local_files_only=True))
    except LocalEntryNotFoundError as error:
        raise DataSourceError(f"The tokenizer of {repo_id!r} is not in the local Hugging Face "
                              f"cache: {error} {hint}") from error
    if not any((snapshot / name).is_file() for name in ("tokenizer.json",
                                                         "tokenizer_config.json")):
        raise DataSourceError(f"The cached snapshot of {repo_id!r} ({snapshot}) has no "
                              f"tokenizer.json or tokenizer_config.json. {hint}")
    return snapshot


def _native(model_type: str | None) -> bool:
    """Whether transformers has its own class for ``model_type``: then a leftover ``auto_map``
    (as in Phi-3.5-mini's config) is ignored with trust_remote_code off, and the model loads."""
    from transformers import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def link_model(snapshot: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """Fill ``out_dir`` with symlinks to a snapshot's files (no copy of the weights)."""
    snapshot, out_dir = Path(snapshot), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for path in sorted(snapshot.rglob("*")):
        if path.is_file():
            target = out_dir / path.relative_to(snapshot)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path.resolve())
            names.append(path.relative_to(snapshot).as_posix())
    return names


def cached_dataset(
    repo_id: str, patterns: str | list[str], cache_dir: str | os.PathLike | None = None
) -> CachedDataset:
    """Locate a data set in the hub cache; raise DataSourceError with fetch instructions if absent.

    ``cache_dir`` defaults to huggingface_hub's HF_HUB_CACHE, which it reads at import; passing it
    explicitly makes the lookup independent of import-time environment variables.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.utils import filter_repo_objects

    patterns = _as_list(patterns)
    cache = str(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE)
    try:
        snapshot = Path(
            snapshot_download(
                repo_id,
                repo_type="dataset",
                allow_patterns=patterns,
                cache_dir=cache,
                local_files_only=True,
            )
        )
    except LocalEntryNotFoundError as error:
        raise DataSourceError(
            f"Data set {repo_id!r} is not in the local Hugging Face cache: {error} "
            + _fetch_hint(repo_id, patterns, cache)
        ) from error
    candidates = sorted(
        path.relative_to(snapshot).as_posix() for path in snapshot.rglob("*") if path.is_file()
    )
    matched = [
        snapshot / name
        for name in filter_repo_objects(candidates, allow_patterns=patterns)
        if name.endswith(READABLE_SUFFIXES)
    ]
    if not matched:
        raise DataSourceError(
            f"The cached snapshot of {repo_id!r} ({snapshot}) has no {'/'.join(READABLE_SUFFIXES)} "
            f"file matching {patterns}. " + _fetch_hint(repo_id, patterns, cache)
        )
    return CachedDataset(repo_id=repo_id, snapshot=snapshot, files=tuple(matched))


def _missing_field(field: str, path: Path) -> DataSourceError:
    return DataSourceError(f"field {field!r} is missing from records of {path}")


def _file_records(path: Path, fields: list[str]) -> Iterator[dict]:
    """Yield the records of one .jsonl/.json/.parquet file, checking that ``fields`` are present."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        for field in fields:
            if field not in parquet.schema_arrow.names:
                raise _missing_field(field, path)
        for batch in parquet.iter_batches(columns=fields, batch_size=4096):
            yield from batch.to_pylist()
        return
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as handle:
            records = (json.loads(line) for line in handle if line.strip())
            yield from _checked(records, fields, path)
        return
    with open(path, encoding="utf-8") as handle:
        records = json.load(handle)
    if not isinstance(records, list):
        raise DataSourceError(f"{path} must hold a JSON list of records")
    yield from _checked(records, fields, path)


def _checked(records, fields: list[str], path: Path) -> Iterator[dict]:
    for record in records:
        for field in fields:
            if not isinstance(record, dict) or field not in record:
                raise _missing_field(field, path)
        yield record


def iter_shards(dataset: CachedDataset, fields: list[str]
                ) -> Iterator[tuple[Path, str, Iterator[dict]]]:
    """``(path, path in the snapshot, its records)`` per file in sorted order; a file is opened
    only when its records are read, and a parquet file is read batch by batch (a .json list is
    read whole)."""
    for path in dataset.files:
        yield path, path.relative_to(dataset.snapshot).as_posix(), _file_records(path, fields)


def blob_sha256(path: Path) -> str:
    """SHA-256 of a cached file. The hub cache names the blob of a large (LFS) file by its
    SHA-256, so a multi-gigabyte shard is not read a second time to hash it; any other file (a
    small git-stored one, or a cache copied without its links) is hashed."""
    target = path.resolve()
    if path.is_symlink() and re.fullmatch(r"[0-9a-f]{64}", target.name):
        return target.name
    return sha256_file(path)


def iter_records(
    dataset: CachedDataset, fields: list[str], limit: int | None = None
) -> Iterator[tuple[str, dict]]:
    """Yield ``(record id, record)`` over the files in sorted order, stopping after ``limit``."""
    if limit is not None and limit <= 0:
        return
    count = 0
    for _, relative, records in iter_shards(dataset, fields):
        for row, record in enumerate(records):
            yield f"{relative}:{row}", record
            count += 1
            if limit is not None and count >= limit:
                return


def prepare_hub_model(repo_id: str, revision: str | None, out_dir: str | os.PathLike) -> dict:
    """``out_dir``: links to the cached snapshot plus ``hub_card.json`` (repo, commit, files)."""
    from effllm.io import atomic_dir, write_json

    snapshot = cached_model(repo_id, revision)
    with atomic_dir(out_dir) as tmp:
        files = link_model(snapshot, tmp)
        card = {"repo_id": repo_id, "revision": snapshot.name, "snapshot": str(snapshot),
                "files": [{"path": name, "bytes": (snapshot / name).stat().st_size}
                          for name in files]}
        write_json(Path(tmp) / "hub_card.json", card)
    return card
