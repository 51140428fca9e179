"""The record type: schema-valid JSON, statuses, and no 0 for what was not measured."""

import json

import pytest

from effllm.records import (
    METRICS, Metric, RecordError, RunRecord, load_record, provenance, now_iso, validate_record,
)


def make_record(**metrics):
    return RunRecord(
        run_id="pretrain/gqa-tiny-s0", stage="pretrain", technique="gqa", model_size="tiny",
        seed=0, config_hash="0123456789abcdef", params={"group": "g"},
        provenance=provenance(now_iso()), metrics=metrics or {
            "al": Metric.measured(0.1, "s", "perf_counter"),
            "aec": Metric.unavailable("W", "none", "no RAPL"),
        },
    )


def test_round_trip_and_schema(tmp_path):
    rec = make_record()
    rec.save(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    validate_record(data)
    assert data["metrics"]["aec"] == {"value": None, "unit": "W", "method": "none",
                                      "status": "unavailable", "note": "no RAPL"}
    back = load_record(tmp_path / "r.json")
    assert back.metrics["al"].value == 0.1
    prov = data["provenance"]
    assert prov["packages"]["torch"].startswith("2.13")
    assert prov["cpu_model"] and prov["start_time"] <= prov["end_time"]


def test_unavailable_metric_cannot_carry_a_value():
    with pytest.raises(RecordError):
        Metric(0.0, "W", "none", "unavailable")
    with pytest.raises(RecordError):
        Metric(None, "W", "rapl", "measured")
    with pytest.raises(RecordError):
        Metric(float("nan"), "W", "rapl", "measured")
    with pytest.raises(RecordError):
        Metric(1.0, "W", "rapl", "guessed")


@pytest.mark.parametrize("mutate, where", [
    (lambda d: d.__setitem__("stage", "training"), "stage"),
    (lambda d: d["metrics"]["al"].pop("method"), "metrics.al"),
    (lambda d: d["metrics"]["aec"].__setitem__("value", 0), "aec"),
    (lambda d: d.__setitem__("config_hash", "xyz"), "config_hash"),
    (lambda d: d.pop("provenance"), "provenance"),
    (lambda d: d["metrics"]["al"].__setitem__("unit", "GB"), "al"),
    (lambda d: d["metrics"].__setitem__("speed", d["metrics"]["al"]), "speed"),
])
def test_schema_rejects_broken_records(mutate, where):
    data = make_record().to_dict()
    mutate(data)
    with pytest.raises(RecordError, match=where.split(".")[0]):
        validate_record(data)


def test_every_metric_has_a_direction_and_unit():
    for name, info in METRICS.items():
        assert info.unit and info.label, name
        assert isinstance(info.higher_is_better, bool)


def test_technique_findings_name_each_broken_expectation(tmp_path):
    """The default-run acceptance check (tests/invariants.py) passes good records and names
    each broken expectation."""
    from invariants import technique_findings

    def write(stage, run, **metrics):
        folder = tmp_path / stage / run
        folder.mkdir(parents=True)
        (folder / "record.json").write_text(json.dumps(
            {"metrics": {k: {"value": v} for k, v in metrics.items()}}))

    write("inference", "bf16-lora-gqa-small-s0", memory_weights=2.0, amu=3.0)
    write("inference", "int4-lora-gqa-small-s0", memory_weights=0.6, amu=1.5)
    for name, kv, amu in (("mha", 8, 1.0), ("mqa", 2, 1.0), ("gqa", 4, 1.0), ("mla", 1, 1.0),
                          ("moe-8x", 4, 2.0)):
        write("pretrain", f"{name}-small-s0", kv_cache_bytes_per_token=kv, amu=amu)
    assert technique_findings(tmp_path) == []
    write("inference", "bf16-full-gqa-small-s0", memory_weights=2.0, amu=3.0)
    write("inference", "int4-full-gqa-small-s0", memory_weights=2.5, amu=1.0)
    write("pretrain", "mqa-tiny-s0", kv_cache_bytes_per_token=4)
    write("pretrain", "gqa-tiny-s0", kv_cache_bytes_per_token=2, amu=3.0)
    write("pretrain", "moe-8x-tiny-s0", kv_cache_bytes_per_token=2, amu=2.0)
    found = technique_findings(tmp_path)
    assert any("int4-full" in f and "memory_weights" in f for f in found)
    assert any(f.startswith("tiny: KV") for f in found)
    assert any("moe-8x-tiny-s0: AMU" in f for f in found)
    assert len(found) == 3
