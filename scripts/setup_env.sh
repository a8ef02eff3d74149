#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv with the pinned stack.
# Usage: bash scripts/setup_env.sh [requirements file, default requirements.txt]
set -euo pipefail
cd "$(dirname "$0")/.."
requirements="${1:-requirements.txt}"
python_bin="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python_bin" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$requirements"
