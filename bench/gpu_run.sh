#!/usr/bin/env bash
# The GPU check on a machine with a CUDA GPU and no network: install the wheels copied with the tree
# (transformers at the version the project pins, faiss for the host key index, and what
# they need that the machine lacks), build the C++ extension, compile the numba kernels
# (ann.precompile, so that no timed step compiles one), run `python -m bench.gpu_check`
# (any arguments after OUT_DIR go to it). From the repository root:
#
#   bash bench/gpu_run.sh [OUT_DIR [gpu_check arguments]]   (OUT_DIR default: bench/out)
#
# The wheels are fetched beforehand on a machine with network, into .gpu_wheels (see docs/gpu.md).
set -euo pipefail
out=${1:-bench/out}
shift || true
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
"$py" -m pip install --quiet --no-index --find-links .gpu_wheels "transformers==5.24.0" "faiss-cpu>=1.9"
"$py" -m pip install --quiet --no-deps --no-build-isolation -e . 2>&1 | tee "$out/build.log"
# the extension loaded, or no timing is the engine's (engine.native.ops falls back to torch with a warning)
"$py" -c "from engine.native import ops; raise SystemExit(0 if ops.HAS_EXT else 'the C++ extension did not load')" \
    2>&1 | tee -a "$out/build.log"
touch "$out/installed"  # for bench/gpu_session.sh: the parts after this one may run
"$py" -m ann.precompile 2>&1 | tee -a "$out/build.log" ||
    echo "ann.precompile failed (see build.log): the check goes on, its first steps compile the kernels" | tee -a "$out/build.log"
"$py" -m bench.gpu_check --json "$out/gpu_check.json" "$@" 2>&1 | tee "$out/gpu_check.log"
