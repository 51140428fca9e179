"""lm-eval on an in-memory model, offline: local tasks written here, scores checked against our own
log-likelihoods, and the paper's task/metric table checked against the installed lm-eval."""

import json
from pathlib import Path

import lm_eval
import pytest
import torch

from effllm.data.tokenizer import load_tokenizer
from effllm.evaluation.harness import (
    PAPER_TASKS,
    HarnessError,
    TaskSpec,
    average_performance,
    declared_metrics,
    evaluate_tasks,
    task_manager,
)
from effllm.models import DecoderConfig, DecoderForCausalLM

# Short and long choices, the right one sometimes short and sometimes long, so that acc (summed
# log-likelihood, favours short) and acc_norm (per byte, favours long) tend to disagree.
QUESTIONS = [
    ("The number after one is", ["two", "the same as one", "nine hundred and ninety", "ten"], 0),
    ("A cat is an", ["animal", "a", "aeroplane that is made of paper", "idea"], 0),
    ("Water boils at", ["100 degrees Celsius at sea level", "1", "no", "ice"], 0),
    ("The opposite of up is", ["down", "sideways in every direction at once", "u", "p"], 0),
    ("Python is a", ["programming language used by many people", "x", "snake", "car"], 2),
    ("The sun rises in the", ["west", "east", "middle of the night when nobody looks", "s"], 1),
    ("Two plus two is", ["4", "five", "the number that comes just after three", "22"], 0),
    ("The capital of France is", ["Rome", "Paris", "a city somewhere on the moon", "F"], 1),
    ("Red and blue make", ["purple", "green", "red", "a colour nobody has seen before today"], 0),
    ("A week has", ["seven days", "7", "many many years in it usually", "w"], 1),
    ("The letter after x is", ["y", "the letter that comes before z", "ex", "wye"], 0),
    ("One more than eight is", ["9", "ten", "eight and a bit more than that", "nine"], 0),
]
PREFIX = "Question: {q}\nAnswer:"


def _write_tasks(root):
    rows = [{"q": q, "choices": c, "label": y, "answer": c[y]} for q, c, y in QUESTIONS]
    data = root / "tiny.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
              "test_split: test\n")
    metric = "  - metric: {}\n    aggregation: mean\n    higher_is_better: true\n"
    (root / "mc.yaml").write_text(
        "task: tiny_mc\n" + source + "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{q}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\nmetric_list:\n" + metric.format("acc") + metric.format("acc_norm"))
    (root / "gen.yaml").write_text(
        "task: tiny_gen\n" + source + "output_type: generate_until\n"
        'doc_to_text: "Question: {{q}}\\nAnswer:"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 3\n  do_sample: false\n'
        "metric_list:\n" + metric.format("exact_match"))
    # no metric_list: lm-eval's defaults for multiple_choice (acc, acc_norm), unknown to us upfront
    (root / "mc_default.yaml").write_text(
        "task: tiny_mc_default\n" + source + "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{q}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n")
    (root / "offline.yaml").write_text(
        "task: tiny_offline\ndataset_path: effllm-test/never-downloaded\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: choices\n"
        "doc_to_target: label\n")
    return len(rows)


@pytest.fixture(scope="module")
def setup(stdlib_tokens, tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    n = _write_tasks(root)
    tokenizer = load_tokenizer(stdlib_tokens / "tokenizer")
    torch.manual_seed(0)
    model = DecoderForCausalLM(DecoderConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256)).eval()
    return model, tokenizer, root, n


@torch.no_grad()
def _our_accuracies(model, tokenizer):
    """acc and acc_norm from our own forward passes: the continuation " choice" scored after the
    prompt, summed log-probabilities (acc) and divided by the choice's length in characters
    (acc_norm, as lm-eval 0.4.13 defines it: api/task.py, process_results)."""
    hits, hits_norm = 0, 0
    for q, choices, label in QUESTIONS:
        context = PREFIX.format(q=q)
        n_context = len(tokenizer.encode(context, add_special_tokens=False))
        lls = []
        for choice in choices:
            ids = tokenizer.encode(context + " " + choice, add_special_tokens=False)
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            lls.append(sum(logp[i - 1, ids[i]].item() for i in range(n_context, len(ids))))
        norm = [ll / len(c) for ll, c in zip(lls, choices)]
        hits += max(range(len(lls)), key=lls.__getitem__) == label
        hits_norm += max(range(len(norm)), key=norm.__getitem__) == label
    return hits / len(QUESTIONS), hits_norm / len(QUESTIONS)


def test_scores_match_our_loglikelihoods(setup):
    model, tokenizer, root, n = setup
    tasks = {"mc": TaskSpec("tiny_mc", "acc,none"), "mc_norm": ("tiny_mc", "acc_norm,none"),
             "gen": TaskSpec("tiny_gen", "exact_match,none")}
    scores = evaluate_tasks(model, tokenizer, tasks, include_path=root)
    assert set(scores) == set(tasks)
    for name, entry in scores.items():
        assert 0.0 <= entry["score"] <= 1.0
        assert entry["n"] == n
        assert entry["metric_key"] == (tasks[name].metric if isinstance(tasks[name], TaskSpec)
                                       else tasks[name][1])
    acc, acc_norm = _our_accuracies(model, tokenizer)
    assert acc != acc_norm, "data no longer tells acc from acc_norm; the check below is weak"
    assert scores["mc"]["score"] == pytest.approx(acc)
    assert scores["mc_norm"]["score"] == pytest.approx(acc_norm)
    assert scores["mc"]["stderr"] is not None and scores["mc"]["stderr"] > 0
    assert average_performance(scores) == pytest.approx(
        (acc + acc_norm + scores["gen"]["score"]) / 3)


def test_limit_caps_documents(setup):
    model, tokenizer, root, _ = setup
    scores = evaluate_tasks(model, tokenizer, {"mc": ("tiny_mc", "acc,none")}, include_path=root,
                            limit=3)
    assert scores["mc"]["n"] == 3


def test_wrong_metric_key_is_refused(setup):
    model, tokenizer, root, _ = setup
    # declared in the YAML: refused before any evaluation
    with pytest.raises(HarnessError, match=r"'exact_match,flexible-extract'.*tiny_mc.*acc,none"):
        evaluate_tasks(model, tokenizer, {"mc": ("tiny_mc", "exact_match,flexible-extract")},
                       include_path=root)
    # lm-eval's defaults, known only from the results: refused after evaluation
    with pytest.raises(HarnessError, match=r"'exact_match,none' missing.*tiny_mc_default"):
        evaluate_tasks(model, tokenizer, {"mc": ("tiny_mc_default", "exact_match,none")},
                       include_path=root, limit=2)


def test_unknown_task_is_refused(setup):
    model, tokenizer, root, _ = setup
    with pytest.raises(HarnessError, match="MMLU"):
        evaluate_tasks(model, tokenizer, ["MMLU"], include_path=root)  # not a PAPER_TASKS name


def test_missing_dataset_names_it_and_how_to_fetch_it(setup):
    model, tokenizer, root, _ = setup
    with pytest.raises(HarnessError, match=r"effllm-test/never-downloaded.*load_dataset"):
        evaluate_tasks(model, tokenizer, {"x": ("tiny_offline", "acc,none")}, include_path=root)


def test_average_performance():
    assert average_performance({"a": 0.2, "b": 0.4}) == pytest.approx(0.3)
    assert average_performance({"a": {"score": 1.0}, "b": {"score": 0.0}}) == 0.5
    with pytest.raises(ValueError):
        average_performance({})
    with pytest.raises(ValueError, match="lower-is-better"):
        average_performance({"ppl": {"score": 9.0, "higher_is_better": False}})


def _check_paper_tasks(manager):
    assert set(PAPER_TASKS) == {"MMLU-Pro", "BBH", "GPQA", "IFEval", "MATH", "MuSR"}
    for name, spec in PAPER_TASKS.items():
        assert spec.task in manager.task_index, name
        assert spec.metric in declared_metrics(manager, spec.task), (name, spec.metric)
        assert spec.higher_is_better
    # the keys the released toolkit read (docs/protocol.md §8, defect 10) are not produced at all
    assert "exact_match,none" not in declared_metrics(manager, "leaderboard_bbh")
    assert "exact_match,none" not in declared_metrics(manager, "leaderboard_musr")
    assert "acc,none" not in declared_metrics(manager, "leaderboard_gpqa")
    assert "strict_accuracy,none" not in declared_metrics(manager, "leaderboard_ifeval")


def test_paper_tasks_exist_in_installed_lm_eval():
    """Names and metric keys against the installed lm-eval's leaderboard YAMLs (indexing only: no
    dataset, no network; the folder alone indexes in milliseconds, all ~15k built-ins in ~9 s)."""
    folder = Path(lm_eval.__file__).parent / "tasks" / "leaderboard"
    _check_paper_tasks(task_manager(str(folder), include_defaults=False))


@pytest.mark.slow
def test_paper_tasks_against_full_index(setup):
    """The same through the full built-in index evaluate_tasks uses; an lm-eval name known nowhere
    is refused; offline a paper task either runs from the local cache or its error names the
    dataset (GPQA is gated) and how to fetch it."""
    model, tokenizer, _, _ = setup
    _check_paper_tasks(task_manager())
    with pytest.raises(HarnessError, match="no_such_task"):
        evaluate_tasks(model, tokenizer, {"x": ("no_such_task", "acc,none")})
    try:
        scores = evaluate_tasks(model, tokenizer, ["GPQA"], limit=1)
    except HarnessError as error:
        assert "Idavidrein/gpqa" in str(error) and "load_dataset" in str(error)
    else:
        assert scores["GPQA"]["n"] == 3 and 0 <= scores["GPQA"]["score"] <= 1
