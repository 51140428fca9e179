"""Task scores of an in-memory model with lm-evaluation-harness (the paper's "performance").

The inference axis scores each precision (bf16, fp16, int4, ...) on the six Open LLM Leaderboard
v2 tasks and averages them. The model is passed as an object, never re-loaded from disk, so what is
scored is exactly the (possibly bitsandbytes-quantized) model whose memory, latency and energy are
measured.

Which number to read matters: lm-eval writes several metrics per task, keyed "metric,filter". The
released toolkit read keys the leaderboard tasks never produce (exact_match for BBH and MuSR, acc
for GPQA, strict_accuracy for IFEval; docs/protocol.md §8, defect 10), so
every task here names its key, and a key absent from the results is an error, never a silent None.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    """One scored task: the lm-eval task or group name and the "metric,filter" key to read."""

    task: str
    metric: str
    higher_is_better: bool = True


# Keys checked against the YAMLs of lm-eval 0.4.13, lm_eval/tasks/leaderboard/ (no filter_list in
# any of them, hence the filter "none"; groups aggregate their subtasks weighted by size):
PAPER_TASKS: dict[str, TaskSpec] = {
    # mmlu_pro/mmlu_pro.yaml: metric_list [acc], 5-shot
    "MMLU-Pro": TaskSpec("leaderboard_mmlu_pro", "acc,none"),
    # bbh_mc/_leaderboard_bbh.yaml: group of 24, aggregate_metric_list [acc_norm]; 3-shot
    "BBH": TaskSpec("leaderboard_bbh", "acc_norm,none"),
    # gpqa/_leaderboard_gpqa.yaml: group of diamond/extended/main, aggregate [acc_norm]; 0-shot
    "GPQA": TaskSpec("leaderboard_gpqa", "acc_norm,none"),
    # ifeval/ifeval.yaml: first of its metric_list; the leaderboard's displayed IFEval is the mean
    # of this and inst_level_strict_acc (configure a TaskSpec for the latter to report both)
    "IFEval": TaskSpec("leaderboard_ifeval", "prompt_level_strict_acc,none"),
    # math/_leaderboard_math.yaml: group of 7 (level-5 MATH), aggregate [exact_match]; 4-shot
    "MATH": TaskSpec("leaderboard_math_hard", "exact_match,none"),
    # musr/_musr.yaml: group of 3, aggregate [acc_norm]; 0-shot
    "MuSR": TaskSpec("leaderboard_musr", "acc_norm,none"),
}


class HarnessError(RuntimeError):
    """A task cannot be scored as configured (unknown name, missing metric or data)."""


@functools.lru_cache(maxsize=8)
def task_manager(include_path: str | None = None, include_defaults: bool = True):
    """An lm-eval TaskManager, cached: indexing the ~15k built-in task YAMLs takes seconds."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def _leaves(manager, name: str) -> list:
    """Index entries of the leaf tasks of a task or group (string children only)."""
    entry = manager.task_index[name]
    if name not in manager.all_groups:
        return [entry]
    children = entry.cfg.get("task", [])
    return [leaf for child in children if isinstance(child, str) and child in manager.task_index
            for leaf in _leaves(manager, child)]


def declared_metrics(manager, name: str) -> set[str]:
    """The "metric,filter" keys a task or group declares in its YAML (empty when it relies on
    lm-eval's per-output-type defaults). A group reports only its aggregate_metric_list."""
    entry = manager.task_index[name]
    if name in manager.all_groups:
        aggregated = {m["metric"] for m in entry.cfg.get("aggregate_metric_list", [])}
        return {key for leaf in _leaves(manager, name)
                for key in declared_metrics(manager, leaf.name) if key.split(",")[0] in aggregated}
    filters = [f["name"] for f in entry.cfg.get("filter_list", [])] or ["none"]
    return {f"{m['metric']},{f}" for m in entry.cfg.get("metric_list", []) for f in filters}


def _datasets(manager, name: str) -> str:
    """"path (configs a, b)" for each Hugging Face dataset the task's leaves read."""
    configs: dict[str, set] = {}
    for leaf in _leaves(manager, name):
        if leaf.cfg.get("dataset_path"):
            configs.setdefault(leaf.cfg["dataset_path"], set()).add(leaf.cfg.get("dataset_name"))
    return ", ".join(path + (f" (configs {', '.join(sorted(c for c in names if c))})"
                             if any(names) else "") for path, names in sorted(configs.items()))


def _download_hint(manager, name: str) -> str:
    calls = "; ".join(
        f"load_dataset({leaf.cfg['dataset_path']!r}"
        + (f", {leaf.cfg['dataset_name']!r}" if leaf.cfg.get("dataset_name") else "") + ")"
        for leaf in {leaf.name: leaf for leaf in _leaves(manager, name)}.values()
        if leaf.cfg.get("dataset_path"))
    return (f"on a machine with network access run: python -c \"from datasets import "
            f"load_dataset; {calls}\" (gated datasets such as Idavidrein/gpqa need `hf auth login` "
            f"and accepted terms first), then copy the Hugging Face cache (HF_HOME, default "
            f"~/.cache/huggingface) to this machine")


def _resolve(tasks: dict | list) -> dict[str, TaskSpec]:
    if isinstance(tasks, dict):
        return {name: spec if isinstance(spec, TaskSpec) else TaskSpec(*spec)
                for name, spec in tasks.items()}
    unknown = [name for name in tasks if name not in PAPER_TASKS]
    if unknown:
        raise HarnessError(f"unknown task(s) {unknown}: a list names PAPER_TASKS entries "
                           f"({sorted(PAPER_TASKS)}); pass a dict name -> TaskSpec for others")
    return {name: PAPER_TASKS[name] for name in tasks}


def _check_nltk_punkt(manager, name: str, spec: TaskSpec) -> None:
    """IFEval splits sentences with NLTK's punkt_tab, which lm-eval downloads at import time and,
    offline, fails to download without raising; the failure would surface only after generation."""
    if not any("ifeval" in str(leaf.yaml_path) for leaf in _leaves(manager, spec.task)):
        return
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab")
    except LookupError:
        raise HarnessError(
            f"task {name!r} ({spec.task}) needs the NLTK data 'punkt_tab', which is not installed: "
            f"on a machine with network access run `python -m nltk.downloader -d DIR punkt_tab` "
            f"and point NLTK_DATA at DIR here") from None


def _load(manager, name: str, spec: TaskSpec):
    """The task or group object; loading it loads its datasets, the step that fails offline."""
    try:
        loaded = manager.load([spec.task])
    except OSError as error:  # datasets' offline and not-found errors are OSErrors
        offline = os.environ.get("HF_DATASETS_OFFLINE") or os.environ.get("HF_HUB_OFFLINE")
        where = " offline (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE set)" if offline else ""
        raise HarnessError(
            f"task {name!r} ({spec.task}): dataset {_datasets(manager, spec.task)} is not "
            f"available{where} and not in the local Hugging Face cache ({error}); "
            f"{_download_hint(manager, spec.task)}") from error
    groups = loaded.get("groups", {})
    return groups[spec.task] if spec.task in groups else loaded["tasks"][spec.task]


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _n_samples(raw: dict, task: str) -> int:
    """Documents scored; a group's is the sum over its leaf tasks."""
    if task in raw.get("n-samples", {}):
        return int(raw["n-samples"][task]["effective"])
    return sum(_n_samples(raw, child) for child in raw.get("group_subtasks", {}).get(task, []))


def _manager_for(task: str, include: str | None):
    """The index that knows ``task``: the local YAMLs alone when they suffice (fast), else the
    built-in index (cached once per process), else both (a local group of built-in tasks)."""
    if include:
        local = task_manager(include, include_defaults=False)
        if task in local.task_index:
            leaves = local.task_index[task].cfg.get("task", [])
            if task not in local.all_groups or all(not isinstance(c, str) or c in local.task_index
                                                   for c in leaves):
                return local
            return task_manager(include)
    return task_manager()


def evaluate_tasks(model, tokenizer, tasks: dict | list, *, limit: int | float | None = None,
                   batch_size: int = 1, include_path: str | os.PathLike | None = None,
                   num_fewshot: int | None = None, seed: int = 0,
                   apply_chat_template: bool = False) -> dict[str, dict]:
    """Score ``model`` (an in-memory transformers model; HFLM puts it in eval mode) on ``tasks``.

    ``tasks``: a list of PAPER_TASKS names, or a dict name -> TaskSpec (or (task, metric) tuple);
    several names may read different keys of one lm-eval task, which is then run once.
    ``include_path``: a folder of local task YAMLs. ``limit`` caps documents per leaf task (scores
    are then not comparable with the paper). ``num_fewshot`` None keeps each task's own few-shot
    count (the leaderboard's). Everything is checked (names, declared metric keys, NLTK data,
    datasets in the local cache) before the first forward pass, so a misconfiguration fails in
    seconds rather than after hours of generation. Returns per name: score, metric_key, stderr
    (None if lm-eval gave none), n (documents behind the score), task (the lm-eval name) and
    higher_is_better.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    specs = _resolve(tasks)
    include = str(include_path) if include_path is not None else None
    objects, manager = {}, None
    for name, spec in specs.items():
        manager = _manager_for(spec.task, include)
        if spec.task not in manager.task_index:
            raise HarnessError(f"task {name!r}: {spec.task!r} is not a task or group of the "
                               f"installed lm-eval{' or of ' + include if include else ''}")
        declared = declared_metrics(manager, spec.task)
        if declared and spec.metric not in declared:
            raise HarnessError(f"task {name!r}: metric key {spec.metric!r} is not produced by "
                               f"{spec.task!r}, which reports {sorted(declared)}")
        _check_nltk_punkt(manager, name, spec)
        if spec.task not in objects:
            objects[spec.task] = _load(manager, name, spec)

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    raw = simple_evaluate(
        model=lm, tasks=list(objects.values()), task_manager=manager, limit=limit,
        num_fewshot=num_fewshot, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed, log_samples=False, apply_chat_template=apply_chat_template,
        fewshot_as_multiturn=apply_chat_template)

    scores = {}
    for name, spec in specs.items():
        result = raw["results"].get(spec.task, {})
        if spec.metric not in result:
            reported = sorted(k for k in result if "," in k and "_stderr," not in k)
            raise HarnessError(f"task {name!r}: metric key {spec.metric!r} missing from the "
                               f"results of {spec.task!r}, which reports {reported}")
        metric, _, filt = spec.metric.partition(",")
        counts = result.get("sample_count", {})  # a group: documents of leaves with this metric
        scores[name] = {
            "score": float(result[spec.metric]),
            "metric_key": spec.metric,
            "stderr": _number(result.get(f"{metric}_stderr,{filt}")),
            "n": int(counts[spec.metric]) if spec.metric in counts else _n_samples(raw, spec.task),
            "task": spec.task,
            "higher_is_better": spec.higher_is_better,
        }
    return scores


def average_performance(scores: dict) -> float:
    """The paper's "Avg performance": the unweighted mean of the task scores (each in [0, 1]).

    Accepts evaluate_tasks' output or a plain name -> score mapping. A lower-is-better task has no
    place in this mean and is refused rather than silently mixed in.
    """
    if not scores:
        raise ValueError("no task scores to average")
    values = []
    for name, entry in scores.items():
        if isinstance(entry, dict):
            if not entry.get("higher_is_better", True):
                raise ValueError(f"task {name!r} is lower-is-better; it cannot enter the average")
            entry = entry["score"]
        values.append(float(entry))
    return sum(values) / len(values)


