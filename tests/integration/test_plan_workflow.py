"""The GPU plan through Snakemake: `snakemake plan` writes the plan of every paper job and every
job fits the devices paper.yaml states; a job that does not fit is refused when the DAG is
built, naming it, before anything is written under results/. The hub models are the tests'
placeholder cache, which carries each paper hub model's real config.json architecture."""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
# The Snakefile's own configfile is relative to the working directory (a temporary one here)
CONFIGS = [str(ROOT / "config/config.yaml"), str(ROOT / "config/paper.yaml")]


@pytest.fixture(scope="module")
def paper_hub(tmp_path_factory) -> Path:
    from effllm.config import load_yaml
    from hubcache import stub_cache
    from snakemake.utils import update_config

    paper = load_yaml(ROOT / "config/config.yaml")
    update_config(paper, load_yaml(ROOT / "config/paper.yaml"))
    return stub_cache(tmp_path_factory.mktemp("hub"), paper)


def snakemake(args: list[str], workdir: Path, hub: Path, timeout: int = 900):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EFFLLM_")
           or k == "EFFLLM_CACHE_DIR"}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hub), OMP_WAIT_POLICY="PASSIVE")
    return subprocess.run([str(ROOT / ".venv/bin/snakemake"), "-s", str(ROOT / "Snakefile"),
                           "--directory", str(workdir), "--cores", "2", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_the_paper_plan_shows_every_job_fitting_its_gpus(tmp_path, paper_hub):
    """`snakemake plan --configfile config/paper.yaml`: one row per paper job (pretraining,
    fine-tuning, inference), each fitting the device its resources state (Freeze on the 7-24B
    bases too: ZeRO-3 like Full, not DDP replicas)."""
    result = snakemake(["plan", "--configfile", *CONFIGS], tmp_path, paper_hub, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(tmp_path / "results/plan/plan.tsv") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    stages = {row["stage"] for row in rows}
    assert stages == {"pretrain", "finetune", "inference"}
    unfit = [f"{r['stage']}/{r['run']}: {r['peak_gb']} GB > {r['gpu_memory_gb']}"
             for r in rows if r["fits"] != "yes"]
    assert not unfit, "\n".join(unfit)
    assert {r["gpu_memory_gb"] for r in rows} == {"80", "141"}, {r["gpu_memory_gb"] for r in rows}
    assert all(float(r["peak_gb"]) > 0 for r in rows)
    summary = (tmp_path / "results/plan/plan.md").read_text()
    assert "| total |" in summary and "GPU-hours" in summary


@pytest.mark.slow
def test_full_fine_tuning_of_the_24b_base_on_one_80_gb_gpu_is_refused(tmp_path, paper_hub):
    """Full fine-tuning of Mistral-Small-24B on one 80 GB GPU (parameters, gradients and
    AdamW state alone are ~380 GB) is refused by a dry run, with the job, its peak by part,
    the device and the keys that fit; nothing is written under results/."""
    override = tmp_path / "oversized.yaml"
    override.write_text(yaml.safe_dump({  # paper.yaml's Full runs, that one on 1 GPU
        "finetune": {"methods": ["full"], "datasets": ["o1_sft"], "full": {"offload": False}},
        "pretrain": {"blocks": {"attention": {"sizes": ["0.5b"], "variants": [
            {"name": "gqa", "attention": "gqa"}]}, "position": None, "moe": None,
            "attention_free": None, "pruning": None, "distillation": None}},
        "inference": {"hub_models": ["r1-distill-qwen-1.5b"], "precisions": ["bf16"],
                      "techniques": None},
        "resources": {"finetune": {"gpu_memory_gb": 80,
                                   "jobs": {"full-mistral-small-24b-*": {"gpus": 1}}}},
    }))
    work = tmp_path / "work"
    work.mkdir()
    result = snakemake(["all", "--dry-run", "--configfile", *CONFIGS, str(override)], work,
                       paper_hub)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-2000:]
    assert "job finetune/full-mistral-small-24b-s0 does not fit: predicted peak per GPU on 1 " \
        "GPU(s)" in out, out[-3000:]
    assert "1 of " in out  # the other Full runs, ZeRO-3 on 8 GPUs, fit
    assert "80 GB of each device (resources.finetune.gpu_memory_gb)" in out
    assert "weights" in out and "optimizer" in out
    assert "It would fit with: resources.finetune.gpus:" in out
    assert not (work / "results").exists()


@pytest.mark.slow
def test_auto_resources_give_each_job_the_fewest_gpus_that_fit(tmp_path, paper_hub):
    """`resources.finetune.auto: true` (paper.yaml's 8 GPUs as the most, 80 GB devices): a 1B
    LoRA job asks Slurm for 1 GPU, the 24B Freeze job for more, Full with offload for at least
    2; the fit check then passes on those counts (after the plan test: its simulations are
    cached)."""
    import re

    override = tmp_path / "auto.yaml"
    override.write_text(yaml.safe_dump({"resources": {"finetune": {"auto": True}}}))
    work = tmp_path / "work"
    work.mkdir()
    result = snakemake(["all", "--dry-run", "--configfile", *CONFIGS, str(override)], work,
                       paper_hub, timeout=1500)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    gpus = {}
    for block in out.split("\nrule ")[1:] + out.split("\nlocalrule ")[1:]:
        run = re.search(r"wildcards: run=(\S+)", block)
        gpu = re.search(r"\bgpu=(\d+)", block)
        if block.startswith("finetune") and run and gpu:
            gpus[run.group(1)] = int(gpu.group(1))
    assert gpus["lora-llama-3.2-1b-s0"] == 1, gpus
    assert 1 < gpus["freeze-mistral-small-24b-s0"] <= 8
    assert 2 <= gpus["full-llama-3.2-1b-s0"] <= 8  # offload is ZeRO-3's: never 1
    assert not (work / "results").exists()
