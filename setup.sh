#!/usr/bin/env bash
# Create .venv from pinned versions and install the effllm library into it. Safe to re-run.
# The constraints file keeps the CPU build of torch (see envs/README.md); do not use uv or poetry.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check \
    -c envs/constraints.txt -r envs/requirements.txt 2> >(grep -v "is ignored: it is neither" >&2)
.venv/bin/pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
