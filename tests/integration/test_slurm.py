"""The Slurm profile on a real Slurm: a single-node cluster (munge, slurmctld, slurmd, two fake
GPUs) started on this machine runs the smoke config through ``--profile profiles/slurm``.

Checks that every compute job went through Slurm (and only those: analysis and figures run on
the submit host), that GPU stages asked for their GPUs on the GPU partition and one node, that
fine-tuning jobs given two GPUs ran two torchrun ranks inside the job step, and that the run
leaves exactly the outputs of the workflow's DAG, up to date, as a local run does. Installs
Debian's Slurm packages when they are missing (root only) and stops the daemons it started.
"""

import collections
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from test_workflow import job_counts

ROOT = Path(__file__).resolve().parents[2]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
CLUSTER = ROOT / "tests/slurm/minicluster.sh"
# Rules that run as Slurm jobs; every other rule is a localrule (runs on the submit host).
REMOTE = {"prepare_corpus", "train_tokenizer", "prepare_reasoning", "pretrain",
          "prune_pretrain", "finetune", "inference"}
GPUS = {"finetune": 2, "inference": 1}  # (fake) GPUs per job in this test
# The single-node cluster has no accounting database: status via squeue (its MinJobAge, 2 h, is
# above 3 x the first status-check delay and keeps every job of the run in `scontrol show job`)
# and no account (profiles/slurm/README.md).
CI_OVERRIDES = ["--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks",
                "2", "--slurm-no-account", "--jobs", "2", "--latency-wait", "5"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running single-node Slurm; yields the environment that points at it."""
    install = subprocess.run([str(CLUSTER), "install"], capture_output=True, text=True)
    if install.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot install Slurm: {install.stderr}")
        pytest.skip(f"Slurm not available: {install.stderr.strip()}")
    state = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ)
    try:
        started = subprocess.run([str(CLUSTER), "start", str(state)], capture_output=True,
                                 text=True, timeout=120)
        assert started.returncode == 0, started.stderr
        for line in started.stdout.splitlines():  # export NAME=VALUE
            name, value = line.removeprefix("export ").split("=", 1)
            env[name] = value.replace("$PATH", env["PATH"])
        env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # the jobs' python
        env["HF_HUB_OFFLINE"] = "1"
        env["EFFLLM_ALLOW_CPU"] = "1"  # the GPUs are fake: jobs given them run on the CPU
        yield env
    finally:
        subprocess.run(["scancel", "--full", "--user", str(os.getuid())], env=env,
                       capture_output=True)
        subprocess.run([str(CLUSTER), "stop", str(state)], capture_output=True)


def slurm_jobs(env) -> list[dict]:
    """Every job the controller remembers (MinJobAge 2 h): id, comment, partition, state, GPUs."""
    out = subprocess.run(["scontrol", "show", "job", "-o"], env=env, capture_output=True,
                         text=True, check=True).stdout
    jobs = []
    for line in out.splitlines():
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        if fields.get("JobId"):
            jobs.append(fields)
    return jobs


@pytest.mark.slow
def test_smoke_config_runs_through_the_slurm_profile(slurm, tmp_path):
    cwd = tmp_path / "work"
    shutil.copytree(ROOT / "config", cwd / "config")
    # The smoke grid with the two multi-GPU strategies of fine-tuning only (LoRA: DDP, Full:
    # FSDP), to keep CI short; the local end-to-end test runs every method.
    overlay = {"measure": {"threads": 1},  # a 2-GPU job then needs the node's 2 CPUs
               "finetune": {"methods": ["lora", "full"]},
               "resources": {"partition": {"cpu": "cpu", "gpu": "gpu"},
                             **{stage: {"gpus": n, "mem_mb": 3000, "runtime": 30}
                                for stage, n in GPUS.items()}}}
    (cwd / "config/slurm-test.yaml").write_text(yaml.safe_dump(overlay))
    configs = ["--configfile", "config/smoke.yaml", "config/slurm-test.yaml"]

    def snakemake(*args, timeout=600):
        return subprocess.run([SNAKEMAKE, "--snakefile", str(ROOT / "Snakefile"), *args,
                               *configs], cwd=cwd, env=slurm, capture_output=True, text=True,
                              timeout=timeout)

    planned = job_counts((dry := snakemake("all", "-n", "--profile", str(ROOT / "profiles/slurm")))
                         .stdout + dry.stderr)
    assert planned and REMOTE <= set(planned), dry.stdout[-3000:] + dry.stderr[-3000:]

    begin = time.perf_counter()
    # subprocess.run kills with SIGKILL on timeout: the plugin can ignore SIGTERM.
    result = snakemake("all", "--profile", str(ROOT / "profiles/slurm"), *CI_OVERRIDES,
                       timeout=2400)
    print(f"smoke pipeline through Slurm: {time.perf_counter() - begin:.1f} s")
    assert result.returncode == 0, result.stderr[-6000:]

    # Every compute job went through Slurm, exactly once, and finished there.
    jobs = [job for job in slurm_jobs(slurm) if job.get("WorkDir") == str(cwd)]
    by_rule = collections.Counter(job["Comment"].removeprefix("rule_").split("_wildcards_")[0]
                                  for job in jobs)
    assert dict(by_rule) == {rule: n for rule, n in planned.items() if rule in REMOTE}, by_rule
    for job in jobs:
        rule = job["Comment"].removeprefix("rule_").split("_wildcards_")[0]
        assert job["JobState"] == "COMPLETED", job
        gpus = GPUS.get(rule, 0)
        assert job["Partition"] == ("gpu" if gpus else "cpu"), job
        assert job.get("TresPerJob", "") == (f"gres:gpu:{gpus}" if gpus else ""), job
        assert job["NumNodes"] == "1" and job["NumTasks"] == "1", job  # one task: no rank fan-out
    # Fine-tuning ran one torchrun rank per GPU inside the job (Full sharded, the rest DDP).
    for path in (cwd / "results/finetune").glob("*/record.json"):
        execution = json.loads(path.read_text())["provenance"]["execution"]
        strategy = "FSDP full shard (ZeRO-3)" if path.parent.name.startswith("full-") else "DDP"
        assert execution["backend"] == f"torchrun {strategy} (gloo)", (path, execution)
        assert execution["world_size"] == 2 and execution["device"] == "cpu"
    for path in (cwd / "results/inference").glob("*/record.json"):
        assert json.loads(path.read_text())["provenance"]["execution"]["device"] == "cpu"
    logs = collections.Counter(path.relative_to(cwd / "logs/slurm").parts[0].removeprefix("rule_")
                               for path in (cwd / "logs/slurm").rglob("*.log"))
    assert logs == by_rule  # one log per job, kept for successful jobs too

    # The outputs are the DAG's, all present and up to date: what a local run leaves.
    summary = snakemake("all", "--summary")
    assert summary.returncode == 0, summary.stderr[-3000:]
    rows = [line.split("\t") for line in summary.stdout.splitlines()[1:] if line.strip()]
    assert len(rows) > sum(planned.values()) // 2, summary.stdout  # every output file, listed
    stale = [(row[0], row[-2], row[-1]) for row in rows if row[-2:] != ["ok", "no update"]]
    assert not stale, stale
    again = snakemake("all", "-n")
    assert "Nothing to be done" in again.stdout + again.stderr


def test_paper_scale_dag_builds_through_the_slurm_profile(tmp_path):
    """The paper's whole grid (hub models and data sets stood in for by cache placeholders)
    dry-runs through the Slurm profile: every run is a job, GPU stages ask for their GPUs."""
    from effllm.config import load_yaml
    from effllm.sweep import expand_runs
    from hubcache import stub_cache
    from snakemake.utils import update_config

    paper = load_yaml(ROOT / "config/config.yaml")
    update_config(paper, load_yaml(ROOT / "config/paper.yaml"))
    cache = stub_cache(tmp_path / "hub", paper)
    cwd = tmp_path / "work"
    shutil.copytree(ROOT / "config", cwd / "config")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "EFFLLM_GPU_PARTITION": "gpu-part", "EFFLLM_ACCOUNT": "proj"}
    begin = time.perf_counter()
    result = subprocess.run([SNAKEMAKE, "--snakefile", str(ROOT / "Snakefile"), "all", "-n",
                             "--profile", str(ROOT / "profiles/slurm"), "--configfile",
                             "config/paper.yaml"], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=900)  # a cold GPU-plan cache simulates first
    print(f"paper-scale dry run: {time.perf_counter() - begin:.1f} s")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    counts = job_counts(out)
    runs = expand_runs(paper)
    pruned = sum(1 for run in runs["pretrain"].values() if run.spec.pruning)
    assert counts.get("prune_pretrain", 0) == pruned == 3  # the pruning block's routes
    for stage in ("pretrain", "finetune", "inference"):
        assert counts.get(stage, 0) + (pruned if stage == "pretrain" else 0) == len(
            runs[stage]), (stage, counts)
    # Each job's resolved resources: pretraining on 4 GPUs (MoE 1.5Bx8 on 8, its own), the
    # site's partition and account.
    blocks = out.split("\nrule ")
    pretrain = [b for b in blocks if b.startswith(("pretrain:", "prune_pretrain:"))]
    assert len(pretrain) == len(runs["pretrain"])
    for block in pretrain:
        resources = next(line for line in block.splitlines() if "resources:" in line)
        gpus = "gpu=8" if "run=moe-8x-1.5b-" in block else "gpu=4"
        for item in (gpus, "gpu_memory_gb=80", "slurm_partition=gpu-part",
                     "slurm_account=proj", "runtime=2880", "mem_mb=256000", "cpus_per_gpu="):
            assert item in resources, resources
