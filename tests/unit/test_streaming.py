"""Streaming data preparation (issue 18): a multi-shard parquet corpus in a fake hub cache is
read lazily, split by hash, tokenised into token files of exactly the budget, with flat memory;
training and serving memory-map the token files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from effllm.data import plan
from effllm.data.corpus import CorpusStream, prepare_corpus
from effllm.data.splits import SPLITS, hashed_split, read_split
from effllm.data.tokenizer import (TokenFile, build_tokenizer, encode_documents, load_tokenizer,
                                   token_dtype)
from effllm.io import read_json, sha256_file
from effllm.specs import TokenBudget

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "org/web-text"
DOCUMENTS = {"unit": "document", "validation_fraction": 0.1, "test_fraction": 0.1}
TOKENIZER = {"vocab_size": 400, "min_frequency": 2}


def _words(n: int = 300) -> list[str]:
    rng = np.random.default_rng(123)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return ["".join(rng.choice(letters, rng.integers(2, 9))) for _ in range(n)]


WORDS = _words()


def write_corpus(cache: Path, shards: int = 20, per_shard: int = 100, seed: int = 0) -> Path:
    """A data set of ``shards`` parquet files (``id`` and ``text`` columns, small row groups) in
    a hub cache laid out as huggingface_hub lays it out."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = cache / f"datasets--{REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    folder = repo / "snapshots" / COMMIT / "data"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for shard in range(shards):
        texts = [" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), rng.integers(20, 80)))
                 + "." for _ in range(per_shard)]
        table = pa.table({"id": [f"{shard}-{i}" for i in range(per_shard)], "text": texts})
        pq.write_table(table, folder / f"{shard:03d}_00000.parquet", row_group_size=64)
    return cache


def hf(cache: Path, **overrides) -> dict:
    return {"source": "hf", "hf": {"repo_id": REPO, "files": "data/*.parquet",
                                   "cache_dir": str(cache), **overrides}}


@pytest.fixture(scope="module")
def web(tmp_path_factory) -> Path:
    """20 shards of 100 documents; shard 3 ends with a copy of shard 0's sixth document
    (other case and spacing) and a blank one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cache = write_corpus(tmp_path_factory.mktemp("hub"))
    folder = cache / f"datasets--org--web-text/snapshots/{COMMIT}/data"
    copy = pq.read_table(folder / "000_00000.parquet")["text"][5].as_py().upper()
    third = folder / "003_00000.parquet"
    extra = pa.table({"id": ["copy", "blank"], "text": ["  " + copy.replace(" ", "   "), " \x00 "]})
    pq.write_table(pa.concat_tables([pq.read_table(third), extra]), third, row_group_size=64)
    return cache


# ------------------------------------------------------------------------------------ corpus


def test_streamed_corpus_stops_at_the_sample_and_splits_by_hash(web, tmp_path):
    card = prepare_corpus(hf(web), DOCUMENTS, 0, tmp_path / "corpus", sample_documents=500)
    splits = {split: read_split(tmp_path / "corpus", split) for split in SPLITS}
    assert len(splits["train"]) == 500 == card["splits"]["train"]["documents"]
    for split, docs in splits.items():
        assert docs and card["splits"][split]["documents"] == len(docs)
        assert card["splits"][split]["sha256"] == sha256_file(tmp_path / f"corpus/{split}.jsonl")
        assert all(hashed_split(d["id"], 0, 0.1, 0.1) == split for d in docs)
    held_out = len(splits["validation"]) + len(splits["test"])
    assert 0.12 < held_out / card["documents_after_dedup"] < 0.28  # 0.2 in expectation
    # Read in shard order and only as far as needed: 500 train documents in about 6 shards.
    files = card["source"]["files"]
    assert [f["path"] for f in files] == [f"data/{i:03d}_00000.parquet" for i in range(len(files))]
    assert 5 <= len(files) < 20 and not files[-1]["complete"] and files[0]["complete"]
    assert sum(f["rows_read"] for f in files) == card["documents_loaded"]
    snapshot = web / f"datasets--org--web-text/snapshots/{COMMIT}"
    assert files[1]["sha256"] == sha256_file(snapshot / files[1]["path"])
    assert card["duplicates_removed"] == 1 and card["documents_empty"] == 1
    assert card["stream_ended"] == "sample_documents" and card["source"]["files_matched"] == 20
    again = prepare_corpus(hf(web), DOCUMENTS, 0, tmp_path / "again", sample_documents=500)
    assert again == card
    assert (tmp_path / "again/test.jsonl").read_bytes() == (tmp_path / "corpus/test.jsonl"
                                                            ).read_bytes()


def test_streamed_corpus_refuses_book_units(web, tmp_path):
    with pytest.raises(ValueError, match="data.split.unit must be document"):
        prepare_corpus(hf(web), {**DOCUMENTS, "unit": "book"}, 0, tmp_path / "c", 10)
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------------------------ tokens


@pytest.fixture(scope="module")
def corpus_dir(web, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("streamed") / "corpus"
    prepare_corpus(hf(web), DOCUMENTS, 0, out, sample_documents=300)
    return out


BUDGET = {"train": 20_000, "validation": 3_000, "test": 2_500}


@pytest.fixture(scope="module")
def tokens_dir(web, corpus_dir) -> Path:
    out = corpus_dir.parent / "tokens"
    build_tokenizer(corpus_dir, {**TOKENIZER, "sample_documents": 300}, out, budget=BUDGET,
                    corpus=hf(web), split_spec=DOCUMENTS, seed=0, batch_characters=16_000)
    return out


def test_token_files_hold_exactly_the_budget_of_the_stream(web, corpus_dir, tokens_dir):
    """Each file is the stream's documents of its split, encoded one by one and cut at the
    budget: checked against an independent re-encoding."""
    tokenizer = load_tokenizer(tokens_dir / "tokenizer")
    card = read_json(tokens_dir / "card.json")
    expected = {split: [] for split in SPLITS}
    for split, doc in CorpusStream(hf(web), DOCUMENTS, 0):
        if len(expected[split]) < BUDGET[split]:
            expected[split] += tokenizer.encode(doc["text"], add_special_tokens=False)
            expected[split].append(tokenizer.eos_token_id)
        if all(len(expected[s]) >= BUDGET[s] for s in SPLITS):
            break
    for split in SPLITS:
        tokens = np.load(tokens_dir / f"{split}.npy", mmap_mode="r")
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
        assert tokens.size == BUDGET[split] == card["splits"][split]["tokens"]
        assert tokens.tolist() == expected[split][:BUDGET[split]]
        assert card["splits"][split]["budget_filled"] is True
        assert card["splits"][split]["sha256"] == sha256_file(tokens_dir / f"{split}.npy")
        # The corpus stage's JSONL is the head of the same stream.
        head = read_split(corpus_dir, split)[0]["text"]
        first = tokenizer.encode(head, add_special_tokens=False)
        assert tokens[:len(first)].tolist() == first[:BUDGET[split]]
    assert card["sample"] == {"documents": 300, "characters": sum(
        len(d["text"]) for d in read_split(corpus_dir, "train"))}
    assert card["sample_documents"] == 300
    assert card["read"]["stream_ended"] == "budgets_filled"
    assert card["read"]["documents_loaded"] < 20 * 100  # stopped before the end


def test_a_source_shorter_than_the_budget_gives_all_it_has(web, corpus_dir, tmp_path):
    card = build_tokenizer(corpus_dir, {**TOKENIZER, "sample_documents": 300}, tmp_path / "t",
                           budget={"train": None, "validation": 10**9, "test": 50}, corpus=hf(web),
                           split_spec=DOCUMENTS, seed=0)
    assert card["read"]["stream_ended"] == "source_ended"
    assert card["read"]["documents_loaded"] == 20 * 100 + 2
    validation = card["splits"]["validation"]
    assert validation["budget_filled"] is False and validation["tokens"] < 10**9
    assert card["splits"]["test"]["tokens"] == 50 and card["splits"]["test"]["budget_filled"]
    assert card["splits"]["test"]["last_document_cut"] and card["splits"]["test"]["documents"] == 1
    every = [split for split, _ in CorpusStream(hf(web), DOCUMENTS, 0)]
    for split in ("train", "validation"):  # every document of the corpus, none cut
        assert card["splits"][split]["documents"] == every.count(split)
        assert not card["splits"][split]["last_document_cut"]
    assert np.load(tmp_path / "t/train.npy", mmap_mode="r").size == card["splits"]["train"][
        "tokens"]


def test_token_file_is_what_np_save_writes(tmp_path):
    ids = np.arange(1000, dtype=np.uint16)
    for budget, expected in ((None, ids), (337, ids[:337])):
        file = TokenFile(tmp_path / "t.npy", np.dtype(np.uint16), budget)
        file.add(ids[:600], np.array([100, 600]), ["a" * 10, "b" * 20])
        file.add(ids[600:], np.array([400]), ["c" * 5])
        file.close()
        np.save(tmp_path / "ref.npy", expected)
        assert (tmp_path / "t.npy").read_bytes() == (tmp_path / "ref.npy").read_bytes()
    assert (file.documents, file.characters, file.truncated) == (2, 30, True)
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


# ------------------------------------------------------------------------------- flat memory

# Peak RSS is the child's VmHWM: getrusage's ru_maxrss survives exec, so a child forked from
# the (larger) pytest process would report the parent's size.
CHILD = r"""
import json, sys
from effllm.data.corpus import prepare_corpus
from effllm.data.tokenizer import build_tokenizer
corpus, split, sample, budget, out, batch = json.loads(sys.argv[1])
prepare_corpus(corpus, split, 0, out + "/corpus", sample)
card = build_tokenizer(out + "/corpus", {"vocab_size": 400, "sample_documents": sample},
                       out + "/tokens", budget=budget, corpus=corpus, split_spec=split, seed=0,
                       batch_characters=batch)
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(json.dumps({"rss_kb": peak,
                  "read": card["read"]["documents_loaded"],
                  "tokens": {s: e["tokens"] for s, e in card["splits"].items()}}))
"""


def data_stage(cache: Path, out: Path, budget: dict, sample: int = 300) -> dict:
    """Both data-stage steps in a fresh process, set up as workflow/scripts sets up the jobs:
    its peak RSS, what it read and wrote. Memory is bounded by the encoding batch (64 k
    characters here, a tenth of the small corpus), so that even the small corpus fills many."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true",
           "ARROW_DEFAULT_MEMORY_POOL": "system"}
    args = json.dumps([hf(cache), DOCUMENTS, sample, budget, str(out), 64_000])
    done = subprocess.run([sys.executable, "-c", CHILD, args], capture_output=True, text=True,
                          env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


needs_proc = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc")


@pytest.mark.slow
@needs_proc
def test_data_stage_memory_stays_flat_as_the_corpus_grows_tenfold(tmp_path):
    """With no budget the tokenizer stage reads every shard: ten times the corpus, ten times the
    tokens on disk, and the same peak memory (< 10 % growth)."""
    small = data_stage(write_corpus(tmp_path / "x1", per_shard=100), tmp_path / "o1", {})
    large = data_stage(write_corpus(tmp_path / "x10", per_shard=1000), tmp_path / "o10", {})
    assert small["read"] == 2_000 and large["read"] == 20_000
    assert large["tokens"]["train"] > 9 * small["tokens"]["train"]
    growth = large["rss_kb"] / small["rss_kb"] - 1
    print(f"peak RSS {small['rss_kb'] / 1024:.0f} MiB -> {large['rss_kb'] / 1024:.0f} MiB "
          f"({growth:+.1%})")
    assert growth < 0.10


@needs_proc
def test_data_stage_on_twenty_shards_writes_the_budget_in_bounded_memory(tmp_path):
    """The acceptance check: a 20-shard parquet corpus, exactly the budget, peak RSS bounded."""
    budget = {"train": 50_000, "validation": 5_000, "test": 5_000}
    result = data_stage(write_corpus(tmp_path / "hub"), tmp_path / "out", budget)
    assert result["tokens"] == budget
    for split, n in budget.items():
        assert np.load(tmp_path / f"out/tokens/{split}.npy", mmap_mode="r").shape == (n,)
    assert result["rss_kb"] < 400 * 1024, result  # the interpreter and its libraries: ~200 MiB


# --------------------------------------------------------------------------------- readers


def test_pretraining_trains_on_memory_mapped_tokens(stdlib_tokens, config, schema, monkeypatch):
    """The array pretraining samples its windows from is the token file, memory-mapped."""
    from effllm.config import check_config
    from effllm.distributed import Placement
    from effllm.sweep import expand_runs
    from effllm.training import pretrain

    seen = {}

    class Seen(Exception):
        pass

    def spy(tokens, *args, **kwargs):
        seen["tokens"] = tokens
        raise Seen

    monkeypatch.setattr(pretrain, "window_batch", spy)
    spec = next(iter(expand_runs(check_config(config, schema))["pretrain"].values())).spec
    with pytest.raises(Seen):
        pretrain.pretrain(spec, Placement(), stdlib_tokens, None)
    assert isinstance(seen["tokens"], np.memmap)
    assert Path(seen["tokens"].filename) == stdlib_tokens / "train.npy"


def test_serving_maps_the_pipelines_tokens_and_encodes_a_bounded_head_otherwise(
        stdlib_tokens, tokens_dir):
    from effllm.inference.run import corpus_test_tokens

    corpus = stdlib_tokens.parent / "corpus"
    ours = corpus_test_tokens(load_tokenizer(stdlib_tokens / "tokenizer"), corpus, 10)
    assert isinstance(ours, np.memmap) and ours.size == np.load(stdlib_tokens / "test.npy").size
    other = load_tokenizer(tokens_dir / "tokenizer")  # another vocabulary: encoded, not mapped
    texts = [doc["text"] for doc in read_split(corpus, "test")]
    whole = encode_documents(other, texts, np.int64)
    head = corpus_test_tokens(other, corpus, 300)
    assert not isinstance(head, np.memmap) and 300 <= head.size < whole.size
    ends = np.flatnonzero(whole == other.eos_token_id) + 1
    assert head.size == ends[np.searchsorted(ends, 300)]  # whole documents, the fewest
    np.testing.assert_array_equal(head, whole[:head.size])
    np.testing.assert_array_equal(corpus_test_tokens(other, corpus), whole)


# -------------------------------------------------------------------------- budget, hub, config


def test_auto_budget_is_what_the_runs_read(config):
    assert plan.token_budget(config) == dict.fromkeys(SPLITS)
    section = {"train": "auto", "validation": 5, "test": None}
    assert TokenBudget.from_json(section, "data.tokens").to_json() == section
    assert TokenBudget.from_json({}).filled() == TokenBudget(None, None, None)
    config["data"]["tokens"] = {"train": "auto", "validation": "auto", "test": 777}
    pre = config["pretrain"]
    budget = plan.token_budget(config)
    assert budget["train"] == pre["steps"] * pre["batch_size"] * pre["seq_len"]
    assert budget["validation"] == max(pre["eval_tokens"], pre["long_context"]["tokens"])
    assert budget["test"] == 777
    config["data"]["tokens"]["test"] = "lots"
    with pytest.raises(ValueError, match="data.tokens.test"):
        plan.token_budget(config)


def test_paper_config_budget_and_schema(repo_root, schema):
    from effllm.config import ConfigError, load_yaml, validate_schema
    from snakemake.utils import update_config

    config = load_yaml(repo_root / "config/config.yaml")
    update_config(config, load_yaml(repo_root / "config/paper.yaml"))
    budget = plan.token_budget(config)
    assert budget["train"] == 20000 * 8 * 2048  # the paper config's 328 M tokens per model
    assert budget["validation"] >= config["pretrain"]["eval_tokens"]
    assert config["data"]["tokenizer"]["sample_documents"] >= 100_000
    validate_schema(config, schema)
    config["data"]["tokens"]["train"] = "lots"
    with pytest.raises(ConfigError, match="data"):
        validate_schema(config, schema)


def test_hub_tokenizer_is_named_by_model_or_repo(config):
    config["hub_models"] = {"qwen": {"repo_id": "Qwen/Qwen2.5-0.5B", "revision": "abc"}}
    assert plan.hub_tokenizer(config) is None
    config["data"]["tokenizer"]["hub"] = "qwen"
    assert plan.hub_tokenizer(config) == {"repo_id": "Qwen/Qwen2.5-0.5B", "revision": "abc"}
    config["data"]["tokenizer"]["hub"] = "org/tok"
    assert plan.hub_tokenizer(config) == {"repo_id": "org/tok", "revision": None}


def test_hub_tokenizer_encodes_the_corpus(hub, use_cache, stdlib_tokens, tmp_path):
    """``data.tokenizer.hub``: the cached model's tokenizer is saved and used, not trained."""
    from hubcache import REPO as MODEL

    use_cache(hub)
    corpus = stdlib_tokens.parent / "corpus"
    card = build_tokenizer(corpus, {"vocab_size": 999, "hub": MODEL}, tmp_path / "t",
                           budget={"test": 100}, hub={"repo_id": MODEL, "revision": None})
    assert card["model"] == "hub tokenizer" and card["repo_id"] == MODEL
    served = load_tokenizer(tmp_path / "t/tokenizer")
    assert card["vocab_size"] == len(served) != 999
    texts = [doc["text"] for doc in read_split(corpus, "train")]
    np.testing.assert_array_equal(np.load(tmp_path / "t/train.npy"),
                                  encode_documents(served, texts, np.uint16))
    assert np.load(tmp_path / "t/test.npy").size == 100
