"""How long Snakemake takes to build the paper-scale DAG through the Slurm profile, side by side
with the default and smoke configs (target: under 10 s for the paper scale).

The paper's hub models and data sets are stood in for by an empty hub cache of placeholders
(`tests/hubcache.stub_cache`): the dry run checks that they are cached and builds every job, but
loads nothing. Each config is dry-run `--repeats` times in a fresh working directory; the
median wall time is printed with the job count.

    .venv/bin/python benchmarks/paper_dag.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from hubcache import stub_cache  # noqa: E402

from effllm.config import load_yaml  # noqa: E402
from snakemake.utils import update_config  # noqa: E402


def dry_run(configfile: str, cache: Path, profile: str) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(ROOT / "config", Path(tmp) / "config")
        env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
        command = [str(Path(sys.executable).with_name("snakemake")), "--snakefile",
                   str(ROOT / "Snakefile"), "all", "-n", "--quiet", "rules", "--profile",
                   str(ROOT / profile), "--configfile", configfile]
        begin = time.perf_counter()
        result = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - begin
    if result.returncode != 0:
        raise SystemExit(f"{configfile}: dry run failed\n{result.stderr[-3000:]}")
    total = re.search(r"^total\s+(\d+)", result.stdout + result.stderr, re.MULTILINE)
    return seconds, int(total.group(1)) if total else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    paper = load_yaml(ROOT / "config/config.yaml")
    update_config(paper, load_yaml(ROOT / "config/paper.yaml"))
    with tempfile.TemporaryDirectory() as tmp:
        cache = stub_cache(Path(tmp), paper)
        print(f"{'config':<20} {'profile':<16} {'jobs':>6} {'median s':>9}")
        for configfile, profile in (("config/smoke.yaml", "profiles/local"),
                                    ("config/config.yaml", "profiles/local"),
                                    ("config/paper.yaml", "profiles/slurm")):
            times, jobs = [], 0
            for _ in range(args.repeats):
                seconds, jobs = dry_run(configfile, cache, profile)
                times.append(seconds)
            print(f"{configfile:<20} {profile:<16} {jobs:>6} {statistics.median(times):>9.2f}")


if __name__ == "__main__":
    main()
