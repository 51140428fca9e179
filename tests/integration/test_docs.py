"""Every command the documentation prints runs exactly as printed.

Commands are collected from every Markdown file of the repository (each line of a ``bash`` block
and each inline code span that starts with a program a user types: ``snakemake``,
``./setup.sh``, ``.venv/bin/...``) and from the comments of the config and profile files. A
Snakemake command runs as printed with ``--dry-run`` appended, so
Snakemake's own parser reads exactly the printed arguments (a target swallowed by
``--configfile`` fails here) while no job runs. The test command runs with ``--collect-only``
appended (CI runs it whole: ``.ci/run``). ``./setup.sh`` runs for real (idempotent, seconds).
"""

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROGRAMS = ("snakemake", "./setup.sh", ".venv/bin/", "export ")
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)


def documented_commands() -> list[tuple[str, str]]:
    """(file, command) for every command a user is shown, in file order."""
    found = []
    for md in sorted(ROOT.glob("**/*.md")):
        if any(part in (".venv", ".snakemake", ".pytest_cache") or part.startswith("tmp")
               for part in md.relative_to(ROOT).parts):
            continue
        text = md.read_text()
        name = str(md.relative_to(ROOT))
        for lang, body in FENCE.findall(text):
            if lang in ("bash", "sh", "shell", "console"):
                lines = [line.split("  #")[0].strip() for line in body.splitlines()]
                found += [(name, line) for line in lines if line and not line.startswith("#")]
        prose = FENCE.sub("", text)
        found += [(name, span) for span in re.findall(r"`([^`\n]+)`", prose)
                  if span.startswith(PROGRAMS) and " " in span]
    for config in sorted([*ROOT.glob("config/*.yaml"), *ROOT.glob("profiles/*/*.yaml")]):
        for line in config.read_text().splitlines():  # commands in the files' comments
            comment = line.partition("#")[2]
            if "snakemake " in comment:
                command = "snakemake " + comment.split("snakemake ", 1)[1].split("  #")[0]
                found.append((str(config.relative_to(ROOT)), command.strip()))
    return found


COMMANDS = documented_commands()


def as_run(command: str) -> str:
    """The command with the one addition that keeps it from running a pipeline or the suite."""
    parts = []
    for part in command.split("&&"):
        words = shlex.split(part)
        program = Path(words[0]).name if words else ""
        if program == "snakemake":
            part = f"{part.rstrip()} --dry-run"
        elif words[1:3] == ["-m", "pytest"]:
            part = f"{part.rstrip()} --collect-only -q"
        parts.append(part)
    return "&&".join(parts)


def test_the_readme_opens_with_the_two_commands_and_ci_runs_the_second():
    commands = [c for f, c in COMMANDS if f == "README.md"][:2]
    assert commands[0].startswith("./setup.sh && ") and "snakemake all" in commands[0]
    assert commands[1] == "./setup.sh && .venv/bin/python -m pytest"
    assert commands[1] in (ROOT / ".ci/run").read_text()


@pytest.fixture(scope="module")
def paper_cache(tmp_path_factory) -> Path:
    """Placeholders of every hub model and data set paper.yaml reads, for its dry run."""
    from effllm.config import load_yaml
    from hubcache import stub_cache
    from snakemake.utils import update_config

    paper = load_yaml(ROOT / "config/config.yaml")
    update_config(paper, load_yaml(ROOT / "config/paper.yaml"))
    return stub_cache(tmp_path_factory.mktemp("hub"), paper)


@pytest.mark.parametrize("where, command", COMMANDS, ids=[f"{f}:{c}" for f, c in COMMANDS])
def test_documented_command_runs_as_printed(where, command, paper_cache):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EFFLLM_")}
    env.update(PATH=f"{ROOT / '.venv/bin'}:{env['PATH']}", HF_HUB_OFFLINE="1",
               HF_HUB_CACHE=str(paper_cache))
    if command.startswith("export "):  # sets the environment for the next line; check it parses
        result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
    else:
        result = subprocess.run(["bash", "-c", as_run(command)], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 0, f"{where}: {command}\n{out[-3000:]}"
    if "snakemake" in command:
        assert "Job stats:" in out or "Nothing to be done" in out, out[-2000:]
