"""The registry of paper figures and tables (effllm.outputs): every entry's function can be
called as the workflow calls it, a configuration gets the figures and tables of its blocks, and
every figure has its caption. That a figure alone builds only what it needs, and that `all`
requests the same figures, tables and number of jobs as before the registry, is checked on the
dry runs of tests/integration/test_workflow.py."""

from __future__ import annotations

import inspect
import re
import runpy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from snakemake.utils import update_config

from effllm import outputs
from effllm.analysis.paper_tables import table_spec
from effllm.codedeps import module_files
from invariants import assert_real_figure
from test_plots_finetune import METHODS, _rows as finetune_rows, _write as finetune_csv
from test_plots_rose import _normalised, _rows

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ["config/config.yaml", "config/smoke.yaml"]


def load_config(configfile: str) -> dict:
    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    update_config(config, yaml.safe_load((ROOT / configfile).read_text()))
    return config


def test_what_the_snakefile_imports_is_light():
    """The registry and every module workflow/rules/common.smk imports load no matplotlib, torch
    or pandas: they are read at every dry run (torch alone adds about a second)."""
    code = ("import sys, effllm.outputs, effllm.codedeps, effllm.config, effllm.cluster, "
            "effllm.sweep; "
            # what common.smk runs at parse time, lazy imports (the tuned-rates file) included
            "c = effllm.config.check_config(effllm.config.load_yaml('config/config.yaml'), "
            "'workflow/schemas/config.schema.yaml'); effllm.sweep.expand_runs(c); "
            "assert not {'matplotlib', 'torch', 'pandas'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


@pytest.mark.parametrize("configfile", CONFIGS)
def test_every_function_imports_and_takes_the_workflows_arguments(configfile):
    config = load_config(configfile)
    for entry in [*outputs.FIGURES.values(), *outputs.tables(["finetune_word_problems"]).values()]:
        function = entry.load()
        assert callable(function), entry.name
        if entry.kind == outputs.FIGURE:  # as workflow/scripts/figure.py calls it
            args = {**entry.inputs, "out_pdf": "a.pdf", "out_png": "a.png",
                    **entry.kwargs(config)}
        else:  # as workflow/scripts/paper_table.py does
            args = {**entry.inputs, "name": entry.name, "out_stem": "a"}
        inspect.signature(function).bind(**args)
        files = module_files(*entry.code_modules, root=ROOT / "src/effllm")
        assert str(ROOT / "src" / Path(*entry.function.partition(":")[0].split("."))
                   .with_suffix(".py")) in files, entry.name


def test_table_blocks_agree_with_the_table_contents():
    for name, entry in outputs.tables(["finetune_word_problems"]).items():
        assert table_spec(name)[0] == entry.block, name
    assert outputs.table("table8_finetune_x").block == "finetune_x"
    with pytest.raises(KeyError, match="table8_finetune_<set>"):
        outputs.table("table8_other")


def test_outputs_follow_the_configured_blocks():
    names = lambda paths: list(dict.fromkeys(Path(p).stem for p in paths))  # noqa: E731
    present = {"attention", "finetune", "inference"}
    assert names(outputs.selected(outputs.FIGURES, present)) == [
        "fig2_ranking", "fig3a_attention_radar", "fig4a_finetune_mirrored",
        "fig4b_finetune_area", "fig5_inference_rose", "inference_radar"]
    assert names(outputs.selected(outputs.tables(), present)) == [
        "table3_attention", "table7_finetune", "table9_inference", "table16_tasks"]
    assert outputs.FIGURES["fig2_ranking"].paths == ["paper_figures/fig2_ranking.pdf",
                                                     "paper_figures/fig2_ranking.png"]


def test_every_figure_has_its_caption_and_it_renders():
    from docutils.core import publish_parts
    from jinja2 import Environment

    text = (ROOT / "workflow/report/figure.rst").read_text()
    assert re.findall(r'figure == "(\w+)"', text) == list(outputs.FIGURES)
    template = Environment(trim_blocks=True, lstrip_blocks=True).from_string(text)
    for configfile in CONFIGS:
        config = load_config(configfile)
        for name, entry in outputs.FIGURES.items():
            caption = template.render(snakemake=SimpleNamespace(
                wildcards=SimpleNamespace(figure=name), config=config,
                params=SimpleNamespace(kwargs=entry.kwargs(config))))
            assert len(caption.strip()) > 200, name
            html = publish_parts(caption, writer="html")["body"]
            assert "System Message" not in html, (name, html)


def run_script(script: str, tmp_path: Path, **snakemake) -> None:
    """Run a workflow script as Snakemake would, with the given ``snakemake`` attributes."""
    stdout, stderr = sys.stdout, sys.stderr  # the script redirects both to its log
    sm = SimpleNamespace(log=[str(tmp_path / f"{script}.log")], **snakemake)
    try:
        runpy.run_path(str(ROOT / "workflow/scripts" / script), init_globals={"snakemake": sm})
    finally:
        sys.stdout.close()
        sys.stdout, sys.stderr = stdout, stderr


def test_scripts_draw_and_write_through_the_registry(tmp_path):
    config = load_config("config/config.yaml")
    inference = str(_normalised(tmp_path, _rows()))
    finetune = str(finetune_csv(tmp_path, finetune_rows(), "finetune.csv"))
    for name, csv, override in (
            ("fig5_inference_rose", inference, {}), ("inference_radar", inference, {}),
            # the test table's own methods, its bases ordered by parameters
            ("fig4a_finetune_mirrored", finetune, {"methods": METHODS, "size_order": None}),
            ("fig4b_finetune_area", finetune, {"methods": METHODS, "size_order": None})):
        out = tmp_path / name
        kwargs = {**outputs.FIGURES[name].kwargs(config), **override}
        run_script("figure.py", tmp_path, wildcards=SimpleNamespace(figure=name),
                   input={"normalised_csv": csv}, params=SimpleNamespace(kwargs=kwargs),
                   output=SimpleNamespace(pdf=str(out / "f.pdf"), png=str(out / "f.png")))
        assert_real_figure(out / "f.pdf", out / "f.png", min_width=600)
    run_script("paper_table.py", tmp_path, wildcards=SimpleNamespace(table="table9_inference"),
               input={"normalised_csv": inference},
               output=SimpleNamespace(csv=str(tmp_path / "t9.csv")))
    for ext in ("csv", "md", "tex"):
        assert (tmp_path / f"t9.{ext}").stat().st_size > 100
