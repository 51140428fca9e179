"""The Snakemake workflow: the default DAG holds every stage, bad input stops before any job,
a failing job leaves no partial output, and the smoke config runs end to end."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from effllm.analysis.aggregate import read_table
from effllm.analysis.claims import CLAIMS
from effllm.records import STATUSES, validate_record
from invariants import assert_served_tokens_are_the_pipelines, technique_findings
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
FIGURES = ("fig2_ranking", "fig3a_attention_radar", "fig3b_position_bars", "fig3c_moe_bubbles",
           "fig4a_finetune_mirrored", "fig4b_finetune_area", "fig5_inference_rose",
           "inference_radar", "fig_pruning_routes", "fig_pruning_dynamics",
           "fig_pruning_architecture", "fig_distillation", "fig_techniques")  # a job each
TABLES = ("table3_attention", "table4_position", "table5_moe", "table6_attention_free",
          "table7_finetune", "table9_inference", "table16_tasks", "table8_finetune_word_problems",
          "table_pruning", "table_distillation", "table_techniques")
TOTAL_JOBS = {"config/config.yaml": 114, "config/smoke.yaml": 89}
STAGE_RULES = {"prepare_corpus", "train_tokenizer", "prepare_reasoning", "pretrain",
               "prune_pretrain", "finetune", "inference", "aggregate", "pruning_tables",
               "normalise", "paper_table", "claims", "figure", "all"}


def workdir(tmp_path: Path, config: dict | None = None) -> Path:
    """A scratch working directory with the config folder the Snakefile expects."""
    shutil.copytree(ROOT / "config", tmp_path / "config")
    if config is not None:
        (tmp_path / "config" / "test.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def snakemake(cwd: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([SNAKEMAKE, "--snakefile", str(ROOT / "Snakefile"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)


def job_counts(output: str) -> dict[str, int]:
    counts, in_table = {}, False
    for line in output.splitlines():
        parts = line.split()
        if parts[:2] == ["job", "count"]:
            in_table = True
        elif in_table and parts[:1] == ["total"]:
            break
        elif in_table and len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    return counts


@pytest.mark.parametrize("configfile", ["config/config.yaml", "config/smoke.yaml"])
def test_dry_run_holds_every_stage(tmp_path, configfile):
    result = snakemake(workdir(tmp_path), "all", "-n", "--configfile", configfile)
    assert result.returncode == 0, result.stderr
    counts = job_counts(result.stdout + result.stderr)
    assert STAGE_RULES <= set(counts), counts
    assert not {"tune", "tune_finetune", "tune_pick"} & set(counts)  # tuning is its own target
    from effllm.sweep import block_seeds, expand_runs

    config = yaml.safe_load((ROOT / configfile).read_text())
    runs = expand_runs(config)
    pruned = [name for name, run in runs["pretrain"].items() if run.spec.pruning]
    # the three routes per seed of the block; its scratch baseline is a pretrain job
    assert counts["prune_pretrain"] == len(pruned) == 3 * len(block_seeds(config, "pruning"))
    assert counts["pretrain"] == len(runs["pretrain"]) - len(pruned)
    sets = config["finetune"]["datasets"]
    assert counts["prepare_reasoning"] == len(sets) == 2  # a second fine-tuning set
    assert counts["finetune"] == len(runs["finetune"]) == 2 * 7
    # tables 3-6, 7 (fine-tuning), 8 (the second fine-tuning set), 9 and 16 (inference)
    assert counts["paper_table"] == len(TABLES)
    assert counts["figure"] == len(FIGURES)  # every block configured: every figure
    assert sum(counts.values()) == TOTAL_JOBS[configfile], counts
    # `all` asks for every figure and table of the registry (effllm.outputs), and only those.
    out = result.stdout + result.stderr
    requested = [p.strip() for p in out.split("\nrule all:\n", 1)[1].split("\n", 1)[0]
                 .split("input:", 1)[1].split(",")]
    assert sorted(p for p in requested if p.startswith("paper_figures/")) == sorted(
        f"paper_figures/{name}.{ext}" for name in FIGURES for ext in ("pdf", "png"))
    assert sorted(p for p in requested if p.startswith("results/tables/table")) == sorted(
        f"results/tables/{name}.{ext}" for name in TABLES for ext in ("csv", "md", "tex"))
    primary = [r for r in runs["finetune"].values() if r.spec.dataset == sets[0]]
    # each served model at each precision, and every variant of the techniques block (its
    # source, a pretraining run, is not served by the inference block)
    assert counts["inference"] == len(primary) * len(config["inference"]["precisions"]) + len(
        config["inference"]["techniques"]["variants"]) == len(runs["inference"])


def test_tune_target_runs_the_grid_on_one_base_and_picks(tmp_path):
    """`snakemake tune`: a fine-tuning run per method and factor on the tune base, then the
    pick; none of it is part of `all` (test_dry_run_holds_every_stage)."""
    from effllm.sweep import tune_runs

    result = snakemake(workdir(tmp_path), "tune", "-n", "--configfile", "config/smoke.yaml")
    assert result.returncode == 0, result.stderr
    counts = job_counts(result.stdout + result.stderr)
    from snakemake.utils import update_config

    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    update_config(config, yaml.safe_load((ROOT / "config/smoke.yaml").read_text()))
    runs = tune_runs(config)
    factors = config["finetune"]["tune"]["factors"]
    assert counts["tune_finetune"] == len(runs) == 7 * len(factors)
    assert counts["tune_pick"] == counts["tune"] == 1
    assert "finetune" not in counts and "inference" not in counts
    assert counts["pretrain"] == 1  # the one base it tunes on
    for name in runs:
        assert f"results/tune/{name}/record.json" in result.stdout


def test_served_second_set_models_are_scored_on_their_own_set(tmp_path):
    config = yaml.safe_load((ROOT / "config/smoke.yaml").read_text())
    config["inference"]["finetune_datasets"] = ["arithmetic", "word_problems"]
    cwd = workdir(tmp_path, config)
    result = snakemake(cwd, "-n", "results/inference/int4-full-gqa-tiny+word_problems-s0/"
                       "record.json", "--configfile", "config/test.yaml")
    assert result.returncode == 0, result.stderr
    jobs = {block.split(":", 1)[0]: block for block in result.stdout.split("\nrule ")[1:]}
    assert "results/data/reasoning/word_problems" in jobs["inference"]
    assert "results/data/reasoning/arithmetic" not in jobs["inference"]
    assert "results/finetune/full-gqa-tiny+word_problems-s0/model" in jobs["inference"]
    assert "results/data/reasoning/word_problems" in jobs["finetune"]
    counts = job_counts(result.stdout + result.stderr)
    assert counts["prepare_reasoning"] == counts["finetune"] == counts["inference"] == 1


def test_single_figure_target_builds_only_its_upstream(tmp_path):
    result = snakemake(workdir(tmp_path), "-n", "paper_figures/inference_radar.pdf")
    assert result.returncode == 0, result.stderr
    counts = job_counts(result.stdout + result.stderr)
    assert counts["figure"] == 1 and "all" not in counts and "paper_table" not in counts
    assert "wildcards: figure=inference_radar" in result.stdout


@pytest.mark.parametrize("mutate, key", [
    (lambda c: c["pretrain"].__setitem__("steps", -1), "pretrain.steps"),
    (lambda c: c["finetune"].__setitem__("methods", ["lora", "magic"]), "finetune.methods.1"),
    (lambda c: c["sizes"]["tiny"].__setitem__("num_heads", 3), "sizes.tiny.hidden_size"),
])
def test_bad_config_stops_before_any_job(tmp_path, mutate, key):
    config = yaml.safe_load((ROOT / "config/smoke.yaml").read_text())
    mutate(config)
    cwd = workdir(tmp_path, config)
    result = snakemake(cwd, "all", "--cores", "1", "--configfile", "config/test.yaml")
    assert result.returncode != 0
    assert key in result.stderr + result.stdout
    assert not (cwd / "results").exists()


def test_missing_config_file_is_named(tmp_path):
    result = snakemake(workdir(tmp_path), "-n", "--configfile", "config/nothere.yaml")
    assert result.returncode != 0
    assert "nothere.yaml" in result.stderr + result.stdout


def test_failing_job_leaves_no_partial_output_and_others_finish(tmp_path):
    config = yaml.safe_load((ROOT / "config/smoke.yaml").read_text())
    # Valid for the schema, impossible at run time: 1-digit sums cannot give 5000 unique problems.
    config["data"]["reasoning"]["arithmetic"]["arithmetic"].update(min_digits=1, max_digits=1,
                                                                   n_train=5000)
    cwd = workdir(tmp_path, config)
    result = snakemake(cwd, "results/data/reasoning/arithmetic", "results/data/tokens", "--cores",
                       "2", "--keep-going", "--configfile", "config/test.yaml")
    assert result.returncode != 0
    assert not (cwd / "results/data/reasoning/arithmetic").exists()
    assert (cwd / "results/data/tokens/card.json").exists()  # the independent job finished


def repo_copy(dest: Path) -> Path:
    """The workflow and library sources, copied so that a test can edit them."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("workflow", "src", "profiles", "envs"):  # envs: the rules' conda env file
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    shutil.copy(ROOT / "Snakefile", dest / "Snakefile")
    return dest


@pytest.mark.slow
def test_smoke_pipeline_end_to_end(tmp_path):
    """Runs the smoke config, checks every output, then checks that editing one library file
    reruns exactly the jobs that use it (the jobs import the installed library; the copy's files
    are the declared code inputs)."""
    repo = repo_copy(tmp_path / "repo")
    cwd = workdir(tmp_path / "work")

    def run(*args, **kw):
        return subprocess.run(
            [SNAKEMAKE, "--snakefile", str(repo / "Snakefile"), *args], cwd=cwd,
            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, **kw)

    begin = time.perf_counter()
    result = run("all", "--profile", str(repo / "profiles/local"), "--configfile",
                 "config/smoke.yaml", timeout=1200)
    elapsed = time.perf_counter() - begin
    print(f"smoke pipeline: {elapsed:.1f} s")
    assert result.returncode == 0, result.stderr[-4000:]
    records = sorted(cwd.glob("results/*/*/record.json"))
    stages = {p.parts[-3] for p in records}
    assert stages == {"pretrain", "finetune", "inference"}
    for path in records:
        data = json.loads(path.read_text())
        validate_record(data)
        # a pretrained model served by the techniques block has never seen the problems: its
        # exact match and token accuracy may well be 0
        untrained = str(data["params"].get("upstream") or "").startswith("pretrain/")
        for name, metric in data["metrics"].items():
            assert metric["status"] in STATUSES
            if metric["status"] == "measured" and name in (
                    "al", "amu", "it", "tt", "st", "perplexity", "tokens_per_s", "token_accuracy",
                    "performance", "decode_latency", "prefill_latency", "weight_bytes",
                    "flops_per_token", "completion_perplexity"):
                if not (untrained and name in ("token_accuracy", "performance")):
                    assert metric["value"] > 0, (path, name)
        assert data["metrics"]["amu"]["status"] == "measured"
        if data["stage"] != "pretrain":
            assert data["metrics"]["exact_match"]["status"] == "measured"
        assert "al" in data["metrics"]
    for card in ("corpus", "tokens", "reasoning/arithmetic", "reasoning/word_problems"):
        assert json.loads((cwd / f"results/data/{card}/card.json").read_text())
    for name in FIGURES:
        for ext, magic in (("pdf", b"%PDF"), ("png", b"\x89PNG")):
            fig = cwd / f"paper_figures/{name}.{ext}"
            assert fig.read_bytes()[:4] == magic and fig.stat().st_size > 5000
    assert (cwd / "results/tables/normalised.csv").stat().st_size > 0
    for table in TABLES:
        for ext in ("csv", "md", "tex"):
            assert (cwd / f"results/tables/{table}.{ext}").stat().st_size > 100
    table8 = (cwd / "results/tables/table8_finetune_word_problems.csv").read_text().splitlines()
    assert len(table8) == 1 + 7 and all(",gqa-tiny+word_problems," in f",{row}" for row in
                                         table8[1:])
    pre = {p.parts[-2]: json.loads(p.read_text())
           for p in cwd.glob("results/pretrain/*/record.json")}
    assert pre["moe-8x-tiny-s0"]["metrics"]["params_active"]["value"] < pre["moe-8x-tiny-s0"][
        "metrics"]["params_total"]["value"]
    for name in ("mamba-tiny-s0", "rwkv-tiny-s0"):
        assert pre[name]["metrics"]["kv_cache_bytes_per_token"]["value"] == 0  # constant state
    kv = {n: pre[f"{n}-tiny-s0"]["metrics"]["kv_cache_bytes_per_token"]["value"]
          for n in ("mha", "mqa", "gqa", "mla")}
    assert kv["mla"] < kv["mqa"] < kv["gqa"] < kv["mha"]
    # The pruning block: every route ends at the target's size or below, on the same tokens.
    scratch = pre["scratch-micro-s0"]["metrics"]
    for route in ("pruning-aware", "oneshot", "oneshot-obs"):
        m = pre[f"{route}-gqa-tiny-to-micro-s0"]["metrics"]
        assert m["params_total"]["value"] <= m["params_target"]["value"] == scratch[
            "params_total"]["value"]
        assert m["params_total"]["value"] < m["params_source"]["value"]
        assert m["route_tokens"]["value"] == 40 * 8 * 64  # smoke: steps x batch x seq_len
    # The distillation block: the student has its twin's shape and tokens, and its teacher.
    student = pre["distilled-gqa-tiny-to-micro-s0"]["metrics"]
    assert student["params_total"]["value"] == scratch["params_total"]["value"]
    assert student["teacher_params"]["value"] == pre["gqa-tiny-s0"]["metrics"]["params_total"][
        "value"]
    assert student["distill_kl"]["status"] == "measured" and student["distill_kl"]["value"] > 0
    # The techniques block: what each variant changes, beside the served model's bf16 run.
    inf = {p.parts[-2]: json.loads(p.read_text())["metrics"]
           for p in cwd.glob("results/inference/*/record.json")}
    plain = inf["bf16-gqa-tiny-s0"]
    assert inf["kv-fp8-gqa-tiny-s0"]["kv_cache_bytes_per_token"]["value"] < 0.6 * plain[
        "kv_cache_bytes_per_token"]["value"]
    for variant in ("hqq4", "ao-int8"):
        assert inf[f"{variant}-gqa-tiny-s0"]["weight_bytes"]["value"] < plain[
            "weight_bytes"]["value"]
        assert inf[f"{variant}-gqa-tiny-s0"]["quantize_seconds"]["status"] == "measured"
    for variant in ("draft", "lookup"):
        m = inf[f"{variant}-gqa-tiny-s0"]
        assert all(m[k]["status"] == "measured" for k in ("tokens_per_pass", "identical_output"))
    assert inf["draft-gqa-tiny-s0"]["draft_acceptance"]["status"] == "measured"
    for variant in ("magnitude-2of4", "wanda-2of4"):  # zeros in dense tensors: the same bytes
        m = inf[f"{variant}-gqa-tiny-s0"]
        assert m["weight_sparsity"]["value"] == 0.5
        assert m["weight_bytes"]["value"] == plain["weight_bytes"]["value"]
    sliced = inf["structured-25-gqa-tiny-s0"]
    assert sliced["weight_sparsity"]["value"] >= 0.2
    assert sliced["weight_bytes"]["value"] < plain["weight_bytes"]["value"]
    # the KV techniques read text back through their cache; the others through the model's own
    assert all(m["kv_perplexity"]["status"] == "measured" for m in inf.values())
    # int4 < bf16 memory for every served model, MoE above dense: from the tensor account
    assert technique_findings(cwd / "results") == []
    assert not list(cwd.glob("results/checkpoints/pretrain/*/checkpoint.pt"))  # cleared
    # Every served model's tokenizer encodes the corpus as the tokenizer stage did (issue 16).
    served = [*sorted(cwd.glob("results/pretrain/*/model")),
              *sorted(cwd.glob("results/finetune/*/model"))]
    assert len(served) == len(records) - sum(p.parts[-3] == "inference" for p in records)
    for model_dir in served:
        assert json.loads((model_dir / "tokenizer.json").read_text())["padding"] is None
        assert_served_tokens_are_the_pipelines(AutoTokenizer.from_pretrained(model_dir),
                                               cwd / "results/data/tokens")

    runs_csv = read_table(cwd / "results/tables/runs.csv")
    pd.testing.assert_frame_equal(pd.read_parquet(cwd / "results/tables/runs.parquet")
                                  .fillna(np.nan), runs_csv.fillna(np.nan), check_dtype=False)
    claims = pd.read_csv(cwd / "results/claims.csv", keep_default_na=False)
    assert set(claims["claim"]) == {c.key for c in CLAIMS}
    verdicts = claims.set_index("claim")["verdict"]
    # no energy counter on this CPU: AEC is estimated from CPU time, judged like any metric
    assert verdicts["nsa_lowest_aec"] == "inconclusive (1 seed)"
    # one seed: no spread to judge a measured difference by
    assert verdicts["mqa_lowest_amu"] == "inconclusive (1 seed)"
    assert "| claim | paper | verdict per group |" in (cwd / "results/claims.md").read_text()

    # Nothing left to do; the report bundles every figure, table and the claims with captions.
    again = run("all", "-n", "--configfile", "config/smoke.yaml")
    assert "Nothing to be done" in again.stdout + again.stderr
    report = run("all", "--configfile", "config/smoke.yaml", "--report", "report.html")
    assert report.returncode == 0, report.stderr[-2000:]
    html = (cwd / "report.html").read_text()
    assert len(html) > 100_000 and "System Message" not in html  # captions render cleanly
    for shown in ("fig2_ranking.pdf", "claims.md", "claims.csv", "table3_attention.md",
                  "table16_tasks.md", "fig3a_attention_radar.pdf"):
        assert shown in html, shown

    # Exact partial reruns: edit one library file, dry-run, compare the job set; then revert.
    figures = {"figure", "all"}
    tables = {"paper_table", "claims"}
    analysis = {"aggregate", "normalise"} | tables | figures
    after_model = {"pretrain", "prune_pretrain", "pruning_tables", "finetune",
                   "inference"} | analysis
    everything = {"prepare_corpus", "train_tokenizer", "prepare_reasoning"} | after_model
    # One figure job per figure whose inputs change: the pruning dynamics and architecture
    # figures read the pruned runs' own tables, not the normalised one, so they rerun only
    # when their code or the pruned runs change.
    every = len(FIGURES)
    figure_jobs = {"plots/style.py": every, "plots/radar.py": 2,  # radar: 3a, inference
                   "analysis/seeds.py": every, "models/decoder.py": every,
                   "data/corpus.py": every, "data/splits.py": every}
    for edited, expected in (("plots/style.py", figures),
                             ("plots/radar.py", figures),
                             ("analysis/claims.py", {"claims", "all"}),
                             ("analysis/seeds.py", tables | figures),  # the one seed mean
                             ("analysis/normalise.py", {"normalise"} | tables | figures),
                             ("inference/run.py", {"inference"} | analysis),
                             ("training/finetune.py", {"finetune", "inference"} | analysis),
                             ("models/nsa.py", {"pretrain"} | analysis),
                             ("models/decoder.py", after_model),
                             ("data/corpus.py", everything - {"prepare_reasoning"}),
                             ("data/splits.py", everything)):
        path = repo / "src/effllm" / edited
        original = path.read_text()
        path.write_text(original + "\n# an edit\n")
        dry = run("all", "-n", "--configfile", "config/smoke.yaml")
        counts = job_counts(dry.stdout + dry.stderr)
        assert set(counts) == expected, edited
        if edited == "models/nsa.py":  # only the NSA model retrains, nothing downstream of others
            assert counts["pretrain"] == 1, counts
        if "figure" in expected:  # one job per figure whose code reaches the file
            assert counts["figure"] == figure_jobs.get(edited, every - 2), (edited, counts)
        path.write_text(original)
    same = run("all", "-n", "--configfile", "config/smoke.yaml")
    assert "Nothing to be done" in same.stdout + same.stderr  # reverted content: no rerun


def test_pruning_figure_builds_only_the_pruning_block(tmp_path):
    """The pruning dynamics figure needs its source, the three pruned routes and their table:
    no other pretraining run, no fine-tuning, no normalisation."""
    result = snakemake(workdir(tmp_path), "-n", "paper_figures/fig_pruning_dynamics.pdf",
                       "--configfile", "config/smoke.yaml")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    counts = job_counts(out)
    assert counts == {"prepare_corpus": 1, "train_tokenizer": 1, "pretrain": 1,
                      "prune_pretrain": 3, "pruning_tables": 1, "figure": 1}, counts
    assert "wildcards: run=gqa-tiny-s0" in out  # the source


def test_one_figure_builds_only_what_it_needs(tmp_path):
    result = snakemake(workdir(tmp_path), "-n", "paper_figures/fig3b_position_bars.pdf",
                       "--configfile", "config/smoke.yaml")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    counts = job_counts(out)
    assert counts["figure"] == 1 and "wildcards: figure=fig3b_position_bars" in out
    assert set(counts) == {"prepare_corpus", "train_tokenizer", "prepare_reasoning", "pretrain",
                           "prune_pretrain", "finetune", "inference", "aggregate", "normalise",
                           "figure"}, counts  # normalised.csv holds every run
    job = out.split("\nrule figure:\n", 1)[1].split("\n\n", 1)[0]
    code = next(line for line in job.splitlines() if line.strip().startswith("input:"))
    assert "plots/bars.py" in code and "plots/style.py" in code
    assert "plots/radar.py" not in code and "plots/ranking.py" not in code


def test_dry_run_links_a_hub_model_before_fine_tuning(tmp_path, hub, repo_root):
    """The DAG reads the hub model through one ``hub_model`` job per model."""
    from effllm.config import load_yaml
    from test_finetune import with_hub

    config = with_hub(load_yaml(repo_root / "config/smoke.yaml"))
    config["finetune"]["bases"] = ["tiny-llama"]
    (tmp_path / "config").mkdir()
    (tmp_path / "config/test.yaml").write_text(json.dumps(config))
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    result = subprocess.run(
        [snakemake, "--snakefile", str(repo_root / "Snakefile"), "-n", "--configfile",
         "config/test.yaml", "--cores", "1", "all"], cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"})
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "results/hub/tiny-llama/model" in out
    methods_n = len(config["finetune"]["methods"]) * len(config["finetune"]["datasets"])
    counts = {line.split()[0]: int(line.split()[1]) for line in out.splitlines()
              if len(line.split()) == 2 and line.split()[1].isdigit()}
    assert counts["hub_model"] == 1 and counts["finetune"] == methods_n
