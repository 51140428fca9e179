"""Where a job runs: the scheduler resources built from config and environment, the device a
job's process picks, the torchrun command of a multi-GPU job, and the refusal of GPU counts a
stage cannot use."""

import json
import os
import subprocess
import sys

import pytest
import torch

from effllm.config import ConfigError, check_config
from effllm.cluster import job_resources
from effllm.distributed import ENV_ALLOW_CPU, ENV_GPUS, place
from effllm.launch import run_stage, torchrun_command


def test_cpu_job_gets_memory_runtime_and_no_gpu(config):
    res = job_resources(config, "data", threads=2, environ={})
    assert res == {"mem_mb": config["resources"]["data"]["mem_mb"],
                   "runtime": config["resources"]["data"]["runtime"]}


def test_gpu_job_asks_for_gpus_model_and_cpus_per_gpu(config):
    config["resources"]["pretrain"] = {"gpus": 4, "gpu_model": "h100", "mem_mb": 64000,
                                       "runtime": 720}
    config["resources"]["partition"] = {"cpu": "short", "gpu": "gpu-long"}
    res = job_resources(config, "pretrain", threads=8, environ={})
    assert res == {"mem_mb": 64000, "runtime": 720, "gpu": 4, "gpu_model": "h100",
                   "cpus_per_gpu": 8, "nodes": 1, "slurm_partition": "gpu-long"}
    assert "tasks" not in res  # on a GPU job it would become --ntasks-per-gpu


def test_environment_wins_over_config_for_partition_and_account(config):
    config["resources"]["partition"] = {"cpu": "short", "gpu": "gpu"}
    config["resources"]["account"] = "from-config"
    env = {"EFFLLM_CPU_PARTITION": "env-cpu", "EFFLLM_GPU_PARTITION": "env-gpu",
           "EFFLLM_ACCOUNT": "env-account"}
    cpu = job_resources(config, "inference", threads=2, environ=env)
    assert cpu["slurm_partition"] == "env-cpu" and cpu["slurm_account"] == "env-account"
    config["resources"]["inference"]["gpus"] = 1
    assert job_resources(config, "inference", 2, environ=env)["slurm_partition"] == "env-gpu"
    assert job_resources(config, "inference", 2, environ={})["slurm_account"] == "from-config"


def test_missing_section_gets_defaults(config):
    del config["resources"]
    assert job_resources(config, "finetune", threads=1, environ={}) == {"mem_mb": 4000,
                                                                        "runtime": 60}
    with pytest.raises(ValueError, match="unknown stage"):
        job_resources(config, "figures", threads=1, environ={})


@pytest.mark.parametrize("stage", ["inference", "data"])
def test_more_than_one_gpu_refused_where_the_stage_runs_in_one_process(config, schema, stage):
    config["resources"][stage]["gpus"] = 2
    with pytest.raises(ConfigError, match=rf"resources\.{stage}\.gpus"):
        check_config(config, schema)
    config["resources"][stage]["gpus"] = 1
    check_config(config, schema)


def test_multi_gpu_fine_tuning_refuses_qlora_and_uneven_batches(config, schema):
    config["resources"]["finetune"]["gpus"] = 2
    check_config(config, schema)  # adapters: DDP; Full: FSDP full shard
    config["finetune"].update(quantized_base=True, methods=["lora"], base_quant={
        "quant_type": "nf4", "double_quant": True, "compute_dtype": "bf16"})
    with pytest.raises(ConfigError, match=r"resources\.finetune\.gpus.*QLoRA"):
        check_config(config, schema)
    config["finetune"]["quantized_base"] = False
    config["resources"]["finetune"]["gpus"] = 3
    with pytest.raises(ConfigError, match=r"'finetune\.batch_size': 8 does not split over"):
        check_config(config, schema)
    config["resources"]["pretrain"]["gpus"] = 3
    with pytest.raises(ConfigError, match=r"'pretrain\.batch_size': 16 does not split over"):
        check_config(config, schema)


def test_zero3_offload_needs_full_on_several_gpus_and_precision_is_checked(config, schema):
    config["finetune"]["full"] = {"offload": True}
    config["resources"]["finetune"]["gpus"] = 1
    with pytest.raises(ConfigError, match=r"'finetune\.full\.offload'.*gpus is 1"):
        check_config(config, schema)
    config["resources"]["finetune"]["gpus"] = 2
    check_config(config, schema)
    config["finetune"]["precision"] = "fp16"  # not a training precision here
    with pytest.raises(ConfigError, match=r"finetune\.precision"):
        check_config(config, schema)
    config["finetune"]["precision"] = "bf16"
    check_config(config, schema)


def test_bad_resources_key_named(config, schema):
    config["resources"]["pretrain"]["gpu"] = 2  # a typo of gpus
    with pytest.raises(ConfigError, match="resources.pretrain"):
        check_config(config, schema)


def test_torchrun_command_starts_one_rank_per_gpu(tmp_path):
    command = torchrun_command(4, "pretrain", tmp_path / "kwargs.json")
    assert command == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       "--nnodes=1", "--nproc-per-node=4", "-m", "effllm.launch", "pretrain",
                       str(tmp_path / "kwargs.json")]
    with pytest.raises(ValueError):
        torchrun_command(1, "pretrain", "x.json")
    # The command is valid for torchrun itself (its own argument parser accepts it).
    help_run = subprocess.run(command[:3] + ["--help"], capture_output=True, text=True)
    for flag in ("--standalone", "--nnodes", "--nproc-per-node"):
        assert flag in help_run.stdout


def test_run_stage_refuses_what_a_stage_cannot_use():
    with pytest.raises(ValueError, match="runs in one process"):
        run_stage("inference", 2)
    with pytest.raises(ValueError, match="unknown stage"):
        run_stage("figures", 0)


def test_a_job_given_gpus_does_not_fall_back_to_the_cpu_silently(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv(ENV_GPUS, "1")
    monkeypatch.delenv(ENV_ALLOW_CPU, raising=False)
    with pytest.raises(RuntimeError, match="given 1 GPU.*EFFLLM_ALLOW_CPU=1"):
        place()
    # a fake GPU (tests/integration/test_slurm.py) runs on the CPU
    monkeypatch.setenv(ENV_ALLOW_CPU, "1")
    assert place().device == "cpu"
    monkeypatch.setenv(ENV_GPUS, "0")
    monkeypatch.delenv(ENV_ALLOW_CPU)
    assert place().device == "cpu" and place().world == 1


def test_gpu_ranks_join_nccl_with_gloo_for_cpu_tensors(monkeypatch):
    """A rank on a GPU gets NCCL for device tensors and Gloo for CPU ones (ZeRO-3 Offload's
    gradient clipping reduces CPU tensors); a CPU rank gets Gloo."""
    import torch.distributed as dist

    joined = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", joined.append)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv(ENV_GPUS, "2")
    placement = place()
    assert joined == ["cpu:gloo,cuda:nccl"]
    assert (placement.device, placement.backend, placement.rank) == ("cuda:1", "nccl", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(ENV_ALLOW_CPU, "1")
    assert place().device == "cpu" and joined[-1] == "gloo"


def test_run_stage_tells_the_stage_its_gpus_and_restores_the_environment(monkeypatch):
    import effllm.launch as launch

    seen = []
    monkeypatch.setitem(launch.STAGE_FUNCTIONS, "inference", ("os", "getenv"))
    monkeypatch.delenv(ENV_GPUS, raising=False)
    monkeypatch.setattr("os.getenv", lambda key: seen.append(os.environ.get(key)))
    run_stage("inference", 1, key=ENV_GPUS)
    assert seen == ["1"] and ENV_GPUS not in os.environ


def test_rank_entry_point_calls_the_stage_with_its_arguments(tmp_path, monkeypatch):
    import effllm.launch as launch

    seen = {}
    monkeypatch.setitem(launch.STAGE_FUNCTIONS, "probe", ("json", "dumps"))
    args = tmp_path / "kwargs.json"
    args.write_text(json.dumps({"obj": [1, 2], "sort_keys": True}))
    monkeypatch.setattr(json, "dumps", lambda **kw: seen.update(kw))
    launch.main(["probe", str(args)])
    assert seen == {"obj": [1, 2], "sort_keys": True}
