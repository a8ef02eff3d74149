#!/usr/bin/env bash
# Set up the environment (if needed) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh requirements-dev.txt
# open-clip-torch only for its BPE data file (the tokenizer-data rebuild test); --no-deps because its dependencies
# would pull torchvision, which breaks transformers here.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps open-clip-torch==3.3.0
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
