"""Code dependencies: a rule's declared library files follow its imports, transitively."""

from pathlib import Path

from effllm.codedeps import module_files

LIB = Path(__file__).resolve().parents[2] / "src/effllm"


def names(*modules):
    return {str(Path(p).relative_to(LIB)) for p in module_files(*modules, root=LIB)}


def test_plotting_reaches_its_imports_only():
    files = names("effllm.plots.radar")
    assert {"plots/radar.py", "plots/style.py", "analysis/aggregate.py", "records.py",
            "record.schema.json", "io.py", "__init__.py", "analysis/__init__.py"} <= files
    assert not any(f.startswith(("models/", "training/", "data/", "measure/")) for f in files)


def test_lazy_imports_inside_functions_count():
    # pretrain imports the tokenizer module inside run_pretrain, not at the top.
    assert "data/tokenizer.py" in names("effllm.training.pretrain")
    assert "data/reasoning.py" in names("effllm.evaluation.scoring")


def test_unknown_or_external_modules_add_nothing():
    assert names("effllm.nothing_here") == {"__init__.py"}
    assert not any("torch" in f for f in names("effllm.measure.timing"))


def test_follows_a_new_import(tmp_path):
    pkg = tmp_path / "effllm"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from effllm.sub import b\n")
    (pkg / "sub" / "b.py").write_text("import effllm.c\n")
    (pkg / "c.py").write_text("x = 1\n")
    (pkg / "d.py").write_text("y = 2\n")
    found = {str(Path(p).relative_to(pkg)) for p in module_files("effllm.a", root=pkg)}
    assert found == {"__init__.py", "a.py", "sub/__init__.py", "sub/b.py", "c.py"}


def test_excluded_modules_are_not_entered_but_shared_imports_stay(tmp_path):
    pkg = tmp_path / "effllm"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    import effllm.nsa\n    import effllm.b\n")
    (pkg / "nsa.py").write_text("import effllm.only_nsa\nimport effllm.c\n")
    (pkg / "b.py").write_text("import effllm.c\n")
    for name in ("only_nsa", "c"):
        (pkg / f"{name}.py").write_text("")
    found = {str(Path(p).relative_to(pkg))
             for p in module_files("effllm.a", root=pkg, exclude=["effllm.nsa"])}
    assert found == {"__init__.py", "a.py", "b.py", "c.py"}
