#!/usr/bin/env bash
# Set up the environment (if needed) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh requirements-dev.txt
# open-clip-torch only for its BPE data file (the tokenizer-data rebuild test); --no-deps because its dependencies
# would pull torchvision, which breaks transformers here.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps open-clip-torch==3.3.0
export HF_HUB_OFFLINE=1
# Two test processes (pytest-xdist), one torch thread each (tests/conftest.py): the tiny-model tests are bound by
# Python overhead, so a second process uses the second core far better than a second torch thread (the suite takes
# 10 minutes instead of 17 on a 2-core AMD EPYC). `--dist loadfile` keeps each file in one process, so its
# module fixtures are built once and its tests run in file order. SDTRAIN_TEST_WORKERS=0 runs in this process
# (a later `-n N` argument also wins).
exec .venv/bin/python -m pytest -n "${SDTRAIN_TEST_WORKERS:-2}" --dist loadfile "$@"
