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
# Keep the torch that is there: without the constraint, pip's resolver may swap it for another build (here it took
# a 5 GB CUDA torch 2.14.1 in place of the CPU 2.13.0 once the test extra grew).
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$venv/bin/python" -c "import torch; print(f'torch=={torch.__version__}')" > "$constraints"
"$venv/bin/python" -m pip install --quiet -c "$constraints" -e ".[test]"
echo "tigbev installed in $venv"
