"""A pretraining job killed mid-run resumes from its last checkpoint and ends exactly where an
uninterrupted run with the same seed ends (checkpoints live outside the declared outputs)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from examples import SPEC


# Slow each step down in the child only, so that the parent can kill it between checkpoints.
CHILD = """
import json, sys, time
import effllm.training.loop as loop
real = loop.Timer.__exit__
def slow(self, *exc):
    time.sleep(float(sys.argv[5]))
    return real(self, *exc)
loop.Timer.__exit__ = slow
from effllm.training.pretrain import run_pretrain
run_pretrain(json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] + "/record.json",
             checkpoint_dir=sys.argv[4] + "/ckpt")
"""


def start(tokens, out, delay):
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(SPEC), str(tokens),
                             str(out / "model"), str(out), str(delay)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def final(out):
    record = json.loads((out / "record.json").read_text())
    return record["series"]["train_loss"], record["metrics"]["al"]["note"]


@pytest.mark.slow
def test_sigkilled_pretraining_resumes_to_the_same_final_loss(stdlib_tokens, tmp_path):
    tokens = stdlib_tokens
    plain = start(tokens, tmp_path / "plain", 0.0)
    assert plain.wait(timeout=300) == 0, plain.stderr.read()
    expected, _ = final(tmp_path / "plain")

    killed = tmp_path / "killed"
    child = start(tokens, killed, 0.05)
    checkpoint = killed / "ckpt" / "checkpoint.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.8)  # well past the first checkpoint, before the end
    assert child.poll() is None, "the run finished before it could be killed"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert not (killed / "record.json").exists() and not (killed / "model").exists()
    assert checkpoint.exists()

    again = start(tokens, killed, 0.0)
    assert again.wait(timeout=300) == 0, again.stderr.read()
    losses, note = final(killed)
    assert "resumed at step" in note
    assert losses == expected  # bit-identical: same batches, same optimiser state
    assert not checkpoint.exists()  # cleared after success


def test_checkpoint_of_other_settings_is_ignored(tmp_path):
    import torch

    from effllm.training.loop import Checkpoint, StepLog, adamw, cosine_schedule

    model = torch.nn.Linear(3, 3)
    opt = adamw(model, 1e-3, 0.0)
    sched = cosine_schedule(opt, 1, 10, 0.1)
    log = StepLog()
    log.losses, log.seconds, log.tokens, log.samples = [1.0, 0.9], [0.1, 0.1], [4, 4], [1, 1]
    Checkpoint(tmp_path, 2, "a").maybe_save(model, opt, sched, log, steps=10)
    assert (tmp_path / "checkpoint.pt").exists()
    assert Checkpoint(tmp_path, 2, "b").load(model, opt, sched).losses == []
    resumed = Checkpoint(tmp_path, 2, "a").load(model, opt, sched)
    assert resumed.losses == [1.0, 0.9] and resumed.starts == [0, 2]
