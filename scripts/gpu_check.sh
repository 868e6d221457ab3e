#!/usr/bin/env bash
# The GPU check of the student and cache side: the CUDA tests (pytest -m gpu) and the student-side bench
# (tigbev bench --cache ... --device cuda). About 3 minutes on a GPU; README, "GPU check", says what it checks.
#
# Needs torch with CUDA and numpy (1 or 2), zarr, numcodecs, fsspec, pyarrow, typer, tqdm, matplotlib, pillow,
# pytest and pytest-timeout. Not spconv, not nuscenes-devkit: tigbev runs from this tree (PYTHONPATH), no install.
#
#   scripts/gpu_check.sh [OUT]          OUT (default runs/gpu-check): pytest.log, bench/, summary.json
#
# Environment:
#   PYTHON                    the interpreter (default: .venv/bin/python where it exists, else python3)
#   TIGBEV_GPU_FIXTURE        the tiny world and its cache (default .gpu-fixture). Made here when spconv and the
#                             devkit import; elsewhere make it with `python scripts/gpu_fixture.py DIR` and copy it.
#   TIGBEV_GPU_CHECK_DEVICE   cuda (default), cuda:N, or cpu to rehearse the whole check without a GPU
#   TIGBEV_WHEELHOUSE         a folder of wheels: missing modules are installed from it, offline
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/gpu-check}"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
device="${TIGBEV_GPU_CHECK_DEVICE:-cuda}"
fixture="${TIGBEV_GPU_FIXTURE:-.gpu-fixture}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
start=$(date +%s)

# 1. The modules the student and cache side import.
missing=$("$py" - <<'EOF'
import importlib.util
mods = {"torch": "torch", "numpy": "numpy", "zarr": "zarr", "numcodecs": "numcodecs", "fsspec": "fsspec",
        "pyarrow": "pyarrow", "typer": "typer", "tqdm": "tqdm", "matplotlib": "matplotlib", "PIL": "pillow",
        "pytest": "pytest", "pytest_timeout": "pytest-timeout"}
print(" ".join(pkg for mod, pkg in mods.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$missing" ]; then
  if [ -n "${TIGBEV_WHEELHOUSE:-}" ]; then
    # shellcheck disable=SC2086  # one package per word
    "$py" -m pip install --quiet --no-index --find-links "$TIGBEV_WHEELHOUSE" $missing
  else
    echo "gpu_check: $py lacks: $missing (pip install $missing, or set TIGBEV_WHEELHOUSE to a folder of wheels)" >&2
    exit 2
  fi
fi

# 2. The device.
if [ "$device" != "cpu" ]; then
  "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "gpu_check: torch $("$py" -c 'import torch; print(torch.__version__)') sees no CUDA device" \
         "(TIGBEV_GPU_CHECK_DEVICE=cpu rehearses the check on the CPU)" >&2
    exit 2
  }
fi

# 3. The fixture.
if [ ! -f "$fixture/fixture.json" ]; then
  if "$py" -c "import spconv, nuscenes.nuscenes" 2>/dev/null; then
    PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$py" scripts/gpu_fixture.py "$fixture"
  else
    echo "gpu_check: no fixture at $fixture, and spconv / nuscenes-devkit are not here to make one: run" \
         "'python scripts/gpu_fixture.py DIR' where tigbev is fully installed, copy DIR here and set" \
         "TIGBEV_GPU_FIXTURE=DIR" >&2
    exit 2
  fi
fi
fixture="$(cd "$fixture" && pwd)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TIGBEV_GPU_CHECK_DEVICE="$device" TIGBEV_GPU_FIXTURE="$fixture"

# 4. The CUDA tests.
set +e
"$py" -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider -q -rA 2>&1 | tee "$out/pytest.log"
tests_rc=${PIPESTATUS[0]}
set -e
tests_s=$(( $(date +%s) - start ))

# 5. The student-side bench.
rm -rf "$out/bench"
"$py" -m tigbev bench --preset demo --dataroot "$fixture/dataroot" --split synth_train --cache "$fixture/cache" \
  --frames 2 --device "$device" --repeats 3 --out "$out/bench"

# 6. The summary.
"$py" - "$out" "$tests_rc" "$tests_s" "$start" <<'EOF'
import json, re, sys, time
from pathlib import Path
import numpy, torch
out, rc, tests_s, start = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
log = (out / "pytest.log").read_text()
counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", log.splitlines()[-1] if log else "")}
bench = json.loads((out / "bench" / "bench.json").read_text())
summary = {"device": bench["device"], "device_name": bench["device_name"], "torch": torch.__version__,
           "cuda": torch.version.cuda, "numpy": numpy.__version__, "tests_exit_code": rc, "tests": counts,
           "tests_s": tests_s, "total_s": int(time.time()) - start,
           "step_s": {m: s["median_step_s"] for m, s in bench["step"].items()},
           "step_over_no_distillation": {m: s["ratio_to_none"] for m, s in bench["step"].items()},
           "peak_memory_mib": {m: s["peak_memory_bytes"] / 2 ** 20 for m, s in bench["step"].items()}}
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary, indent=1))
sys.exit(0 if rc == 0 and counts.get("passed", 0) > 0 and not counts.get("failed") else 1)
EOF
