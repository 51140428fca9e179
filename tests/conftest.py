import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Shared helpers (conftest, hubcache, invariants, examples) live here; test modules import one
# another's fixtures across the two folders.
sys.path[:0] = [str(ROOT / "tests" / "unit"), str(ROOT / "tests" / "integration")]


@pytest.fixture
def repo_root() -> Path:
    return ROOT


@pytest.fixture
def config(repo_root) -> dict:
    """The default config, freshly read (tests may mutate it)."""
    from effllm.config import load_yaml

    return load_yaml(repo_root / "config/config.yaml")


@pytest.fixture
def schema(repo_root) -> Path:
    return repo_root / "workflow/schemas/config.schema.yaml"


@pytest.fixture(scope="session")
def stdlib_tokens(tmp_path_factory) -> Path:
    """A prepared corpus and a trained tokenizer from stdlib docstrings (no install needed):
    the folder the pipeline's ``train_tokenizer`` rule writes."""
    from effllm.data.corpus import prepare_corpus
    from effllm.data.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("stdlib")
    corpus = {"source": "stdlib_docstrings", "stdlib_docstrings": {"max_documents": 80}}
    split = {"unit": "document", "validation_fraction": 0.1, "test_fraction": 0.1}
    prepare_corpus(corpus, split, 0, root / "corpus")
    build_tokenizer(root / "corpus", {"vocab_size": 400, "min_frequency": 2}, root / "tokens")
    return root / "tokens"


@pytest.fixture(scope="session")
def hub(tmp_path_factory, stdlib_tokens) -> Path:
    """A hub cache holding one good model (``hubcache.REPO``); point huggingface_hub at it with
    ``use_cache``."""
    from hubcache import fake_cache

    root = tmp_path_factory.mktemp("hub")
    fake_cache(root, stdlib_tokens)
    return root


@pytest.fixture
def use_cache(monkeypatch):
    """Point huggingface_hub's default cache (read once at import) at a folder."""
    from huggingface_hub import constants

    return lambda root: monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
