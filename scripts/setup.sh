#!/usr/bin/env bash
# Creates a virtual environment (default .venv) with tigbev and its test tools installed.
# torch is installed first, pinned, so that pip takes the local CPU build rather than resolving a CUDA one;
# on a GPU machine, install the torch build for your CUDA into the venv before running this.
set -euo pipefail
venv="${1:-.venv}"
cd "$(dirname "$0")/.."
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  "$venv/bin/python" -m pip install --quiet "torch==2.13.0"
fi
"$venv/bin/python" -m pip install --quiet -e ".[test]"
echo "tigbev installed in $venv"
