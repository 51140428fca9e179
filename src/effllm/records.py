"""The one metric-record type, from measurement to figures.

Every run writes one :class:`RunRecord` as JSON. Every metric is a :class:`Metric` with a value, a
unit, the method that produced it and a status (``measured``, ``estimated`` or ``unavailable``).
An unavailable metric has ``value: null``: a value that was not measured is never written as 0.
The JSON schema (``record.schema.json`` beside this file) is documented in ``docs/records.md``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import socket
import subprocess
from importlib import metadata, resources
from pathlib import Path
from typing import Any, Iterable

from effllm.io import read_json, write_json

SCHEMA_VERSION = 1
# "configured": exact and fixed by the run's settings, not measured (e.g. a precision's nominal
# bits); it is as strong as "measured" wherever statuses combine.
STATUSES = ("measured", "configured", "estimated", "unavailable")


@dataclasses.dataclass(frozen=True)
class MetricInfo:
    """What a metric name means: its unit, which direction is better, its paper abbreviation."""

    unit: str
    higher_is_better: bool
    label: str
    description: str


TASK_PREFIX = "task_"
# The paper's six inference tasks (Open LLM Leaderboard v2, scored by lm-evaluation-harness):
# metric name -> display label. ``inference.harness.tasks`` names them by label.
PAPER_TASK_METRICS = {"task_mmlu_pro": "MMLU-Pro", "task_bbh": "BBH", "task_gpqa": "GPQA",
                      "task_ifeval": "IFEval", "task_math": "MATH", "task_musr": "MuSR"}


def task_metric(name: str) -> str:
    """The metric name of a task score: ``MMLU-Pro`` -> ``task_mmlu_pro``."""
    slug = "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
    return TASK_PREFIX + "_".join(part for part in slug.split("_") if part)


class _Catalogue(dict):
    """Canonical metrics, plus any ``task_<name>``: a task score (a fraction, higher better),
    since configured task lists are open-ended."""

    def __missing__(self, name):
        if isinstance(name, str) and name.startswith(TASK_PREFIX) and name != TASK_PREFIX:
            label = name[len(TASK_PREFIX):]
            return MetricInfo("fraction", True, label, f"score on task {label}")
        raise KeyError(name)

    def get(self, name, default=None):
        try:
            return self[name]
        except KeyError:
            return default

    def __contains__(self, name) -> bool:
        return self.get(name) is not None


# Conditions a window ran under, recorded beside the metrics: never normalised or ranked.
CONDITIONS = frozenset({"machine_load_others"})

# Canonical metric names. Analysis and plots look directions and labels up here, nowhere else.
METRICS: dict[str, MetricInfo] = _Catalogue({
    # quality
    "perplexity": MetricInfo("1", False, "PPL", "exp(mean token NLL) on held-out corpus text"),
    "completion_perplexity": MetricInfo(
        "1", False, "Task PPL", "exp(mean NLL) of held-out reasoning completions"
    ),
    "loss": MetricInfo("nats/token", False, "Loss", "final training loss (mean of the last steps)"),
    "val_loss": MetricInfo("nats/token", False, "Val loss", "mean token NLL on the validation set"),
    "loss_start": MetricInfo("nats/token", False, "Loss 0",
                             "training loss of the first steps (mean of the first 10 %)"),
    "val_loss_start": MetricInfo("nats/token", False, "Val loss 0",
                                 "validation loss before the first training step"),
    "diverged": MetricInfo("1", False, "Diverged", "1 when training diverged (non-finite loss, "
                           "or a final loss above its start), else 0"),
    "exact_match": MetricInfo("fraction", True, "EM", "exact-match accuracy on held-out problems"),
    "token_accuracy": MetricInfo(
        "fraction", True, "Tok acc", "teacher-forced next-token accuracy on held-out completions"
    ),
    "performance": MetricInfo("fraction", True, "Perf", "mean of the configured task scores"),
    # memory
    "amu": MetricInfo(
        "GB", False, "AMU", "time-averaged memory in use over the window (GB = 1e9 B)"
    ),
    "memory_peak": MetricInfo("GB", False, "Peak mem", "peak memory in use over the window"),
    "amu_rss": MetricInfo("GB", False, "AMU (RSS)",
                          "time-averaged process RSS: the CPU's second, labelled figure"),
    "memory_peak_rss": MetricInfo("GB", False, "Peak RSS", "peak process RSS over the window"),
    "memory_tensor_peak": MetricInfo("GB", False, "Tensor peak",
                                     "largest total of live tensors in one unit of the work"),
    "memory_tensor_mean": MetricInfo("GB", False, "Tensor mean",
                                     "time-weighted mean of live tensors in one unit of the work"),
    "memory_weights": MetricInfo("GB", False, "Weights mem",
                                 "parameters, buffers and quantisation state as held"),
    "memory_grads": MetricInfo("GB", False, "Grads mem", "gradients at their largest"),
    "memory_optimizer": MetricInfo("GB", False, "Opt mem", "optimiser state at its largest"),
    "memory_activations": MetricInfo("GB", False, "Act mem",
                                     "activations and temporaries together at their largest"),
    "memory_kv_cache": MetricInfo("GB", False, "KV mem", "decoding state after generation"),
    "load_memory_peak": MetricInfo("GB", False, "Load peak", "peak memory while loading"),
    "memory_torch_allocated_peak": MetricInfo("GB", False, "Alloc peak", "torch allocated peak"),
    "memory_torch_reserved_peak": MetricInfo("GB", False, "Reserved peak", "torch reserved peak"),
    # compute
    "pcu": MetricInfo("fraction", True, "PCU", "time-averaged device utilisation (duty cycle)"),
    "mfu": MetricInfo("fraction", True, "MFU", "model FLOP/s divided by the device's dense peak"),
    "flops_per_token": MetricInfo("FLOP/token", False, "FLOPs/tok", "FLOPs per processed token"),
    # latency
    "al": MetricInfo("s", False, "AL",
                     "mean latency per iteration (training); median per request (inference)"),
    "al_p90": MetricInfo("s", False, "AL p90", "90th percentile of per-iteration latency"),
    "al_cv": MetricInfo("1", False, "AL CV", "coefficient of variation of repeated latencies"),
    "prefill_latency": MetricInfo("s", False, "TTFT", "time to first token per request"),
    "decode_latency": MetricInfo("s/token", False, "TPOT", "time per output token after the first"),
    "decode_latency_long": MetricInfo(
        "s/token", False, "TPOT long", "time per output token after a long prefilled context"
    ),
    # throughput
    "tt": MetricInfo("tokens/param/s", True, "TT", "training tokens per parameter per second"),
    "st": MetricInfo("samples/param/s", True, "ST", "training samples per parameter per second"),
    "it": MetricInfo("tokens/s", True, "IT", "generated tokens per second"),
    "tokens_per_s": MetricInfo(
        "tokens/s", True, "tok/s", "processed (non-padding) tokens per second"
    ),
    "samples_per_s": MetricInfo("samples/s", True, "samples/s", "processed samples per second"),
    # conditions
    "machine_load_others": MetricInfo("fraction", False, "Others' load",
                                      "CPU share other processes used during the window"),
    # energy
    "aec": MetricInfo("W", False, "AEC", "average power over the window: energy / time"),
    "energy": MetricInfo("J", False, "Energy", "energy over the measured window"),
    "energy_per_token": MetricInfo("J/token", False, "J/tok", "window energy per generated token"),
    "efficiency_score": MetricInfo(
        "1", True, "ES", "weighted harmonic mean of normalised resource metrics"
    ),
    # compression and size
    "mcr_nominal": MetricInfo("1", True, "MCR", "(16 / bits) x performance retained"),
    "mcr_measured": MetricInfo("1", True, "MCR (bytes)", "(reference bytes / bytes) x retained"),
    "weight_bytes": MetricInfo("B", False, "Weights", "bytes of the model's weights as held"),
    "linear_weight_bytes": MetricInfo("B", False, "Linear B",
                                      "bytes of the linear layers' weights as held"),
    "bits_nominal": MetricInfo("bits", False, "Bits", "nominal bits per quantised weight"),
    "flops_per_token_6n": MetricInfo("FLOP/token", False, "6N", "analytic 6N training FLOPs"),
    "params_total": MetricInfo("params", False, "Params", "total parameter count"),
    "params_active": MetricInfo("params", False, "Active", "parameters used per token"),
    "params_trainable": MetricInfo("params", False, "Trainable", "parameters updated by training"),
    "kv_cache_bytes_per_token": MetricInfo(
        "B/token", False, "KV B/tok", "KV-cache bytes per token"
    ),
    # the serving techniques (effllm.inference.techniques)
    "kv_perplexity": MetricInfo("1", False, "PPL (cache)",
                                "perplexity of text read back through the decoding cache"),
    "tokens_per_pass": MetricInfo("tokens/pass", True, "Tok/pass",
                                  "new tokens per forward pass of the served model"),
    "draft_acceptance": MetricInfo("1", True, "Accept", "draft tokens accepted / proposed"),
    "identical_output": MetricInfo("fraction", True, "Same out",
                                   "prompts whose greedy output equals plain decoding's"),
    "quantize_seconds": MetricInfo("s", False, "Quant s", "wall time of weight quantisation"),
    "weight_sparsity": MetricInfo("fraction", True, "Sparsity",
                                  "share of the pruned linear layers' weights removed"),
    "prune_seconds": MetricInfo("s", False, "Prune s",
                                "wall time of one-shot pruning, calibration included"),
    # the distillation block's students (effllm.training.distill)
    "distill_kl": MetricInfo("nats/token", False, "KL", "student's KL from its teacher"),
    "teacher_params": MetricInfo("params", False, "Teacher", "parameters of the teacher"),
    # the pruning block's route (effllm.training.prune)
    "params_source": MetricInfo("params", False, "Source", "parameters of the pruned source"),
    "params_target": MetricInfo("params", False, "Target", "parameter count pruned down to"),
    "hidden_size": MetricInfo("1", False, "Hidden", "hidden size of the final model"),
    "source_hidden_size": MetricInfo("1", False, "Src hidden", "hidden size of the source"),
    "route_tokens": MetricInfo("tokens", False, "Tokens", "training tokens of the whole route"),
    "calibration_tokens": MetricInfo("tokens", False, "Calib", "tokens of calibration passes"),
    "prune_phase_seconds": MetricInfo("s", False, "Prune s",
                                      "wall time of source training and pruning"),
    **{f"groups_removed_{kind}": MetricInfo("groups", False, f"-{kind}",
                                            f"{kind} groups pruned away")
       for kind in ("heads", "ffn", "hidden")},
    **{name: MetricInfo("fraction", True, label, f"{label} score (lm-evaluation-harness)")
       for name, label in PAPER_TASK_METRICS.items()},
})


class RecordError(ValueError):
    """A record or metric that breaks the schema or its invariants."""


@dataclasses.dataclass
class Metric:
    value: float | None
    unit: str
    method: str
    status: str
    note: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise RecordError(f"metric status {self.status!r} is not one of {STATUSES}")
        if self.status == "unavailable":
            if self.value is not None:
                raise RecordError("an unavailable metric must have value None, never a number")
        else:
            if self.value is None or not math.isfinite(float(self.value)):
                raise RecordError(
                    f"a {self.status} metric needs a finite value, got {self.value!r}"
                )
            self.value = float(self.value)

    @classmethod
    def measured(cls, value: float, unit: str, method: str, note: str | None = None) -> "Metric":
        return cls(value, unit, method, "measured", note)

    @classmethod
    def configured(cls, value: float, unit: str, method: str, note: str | None = None) -> "Metric":
        return cls(value, unit, method, "configured", note)

    @classmethod
    def estimated(cls, value: float, unit: str, method: str, note: str) -> "Metric":
        return cls(value, unit, method, "estimated", note)

    @classmethod
    def unavailable(cls, unit: str, method: str, note: str) -> "Metric":
        return cls(None, unit, method, "unavailable", note)

    def to_dict(self) -> dict[str, Any]:
        out = {"value": self.value, "unit": self.unit, "method": self.method, "status": self.status}
        if self.note:
            out["note"] = self.note
        return out


@dataclasses.dataclass
class RunRecord:
    """One run's report: what ran, where, with which settings, and every metric it produced."""

    run_id: str
    stage: str
    technique: str
    model_size: str
    seed: int
    config_hash: str
    params: dict[str, Any]
    provenance: dict[str, Any]
    metrics: dict[str, Metric]
    series: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "run_id": self.run_id,
            "stage": self.stage,
            "technique": self.technique,
            "model_size": self.model_size,
            "seed": self.seed,
            "config_hash": self.config_hash,
            "params": self.params,
            "provenance": self.provenance,
            "metrics": {k: m.to_dict() for k, m in sorted(self.metrics.items())},
            "series": self.series,
        }

    @classmethod
    def for_run(cls, spec, start_time: str, metrics: dict[str, Metric],
                series: dict[str, list[float]], execution: dict | None = None) -> "RunRecord":
        """The record of a sweep run (an ``effllm.specs.RunSpec``) that started at
        ``start_time``; ``execution`` (backend, device, precision actually used) goes into the
        provenance."""
        params = spec.to_json()
        return cls(
            run_id=spec.run_id, stage=spec.stage, technique=spec.technique,
            model_size=spec.size, seed=spec.seed, config_hash=config_hash(params),
            params=params, metrics=metrics, series=series,
            provenance=provenance(start_time, extra={"execution": execution} if execution
                                  else None),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunRecord":
        validate_record(data)
        fields = {k: data[k] for k in data if k != "metrics"}
        fields["metrics"] = {k: Metric(**m) for k, m in data["metrics"].items()}
        return cls(**fields)

    def save(self, path: str | os.PathLike) -> None:
        data = self.to_dict()
        validate_record(data)
        write_json(path, data)


def load_record(path: str | os.PathLike) -> RunRecord:
    return RunRecord.from_dict(read_json(path))


def record_schema() -> dict[str, Any]:
    return json.loads(resources.files("effllm").joinpath("record.schema.json").read_text())


def validate_record(data: dict[str, Any]) -> None:
    """Check a record against the JSON schema and the status/value invariants; raise RecordError."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(record_schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = ".".join(str(p) for p in err.absolute_path) or "<record>"
        raise RecordError(f"record {data.get('run_id', '?')}: {where}: {err.message}")
    for name, metric in data["metrics"].items():
        info = METRICS.get(name)
        if info is None:
            raise RecordError(f"metric {name}: not a canonical metric (add it to records.METRICS)")
        if metric["unit"] != info.unit:
            raise RecordError(f"metric {name}: unit {metric['unit']!r}, expected {info.unit!r}")
        if metric["status"] == "unavailable" and metric["value"] is not None:
            raise RecordError(f"metric {name}: unavailable but has a value")
        if metric["status"] != "unavailable" and metric["value"] is None:
            raise RecordError(f"metric {name}: {metric['status']} but has no value")


def config_hash(obj: Any) -> str:
    """A short, order-independent hash of a JSON-able object (the run's resolved settings)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_PACKAGES = (
    "torch", "transformers", "peft", "bitsandbytes", "accelerate", "tokenizers", "safetensors",
    "numpy", "snakemake", "nvidia-ml-py", "effllm",
)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _gpus() -> list[str]:
    try:
        import torch

        if torch.cuda.is_available():
            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - provenance must never fail a run
        pass
    return []


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def provenance(start_time: str, end_time: str | None = None, extra: dict | None = None) -> dict:
    """Where and with what a run ran: git commit, package versions, CPU/GPU, threads, times."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        import torch

        threads = torch.get_num_threads()
    except Exception:  # noqa: BLE001
        threads = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    out = {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "packages": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "gpus": _gpus(),
        "start_time": start_time,
        "end_time": end_time or now_iso(),
    }
    if extra:
        out.update(extra)
    return out


def iter_records(paths: Iterable[str | os.PathLike]) -> list[RunRecord]:
    return [load_record(p) for p in paths]
