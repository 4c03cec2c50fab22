#!/usr/bin/env bash
# The GPU checks of issue 15 in one command: the CUDA correctness test of the probe, then the GPU benchmark.
#
#   bash benchmarks/run_gpu.sh                 # ~1 min test + <= ~7 min benchmark (H100 / H200)
#   QUICK=1 bash benchmarks/run_gpu.sh         # test + the ~1 min benchmark subset
#   BUDGET=300 bash benchmarks/run_gpu.sh      # the benchmark's soft time budget in seconds (default 360)
#   BENCH_ARGS="--device cpu --quick --tiny --archs llava" bash benchmarks/run_gpu.sh   # smoke test, no GPU
#
# Run from the repository root. Outputs go to $OUT if it is set (the device tool's folder), else to
# /tmp/dynamics_gpu_out: env.txt (versions, GPU), cuda_test.txt (pytest), bench_gpu.txt (the figures for README).
#
# Setup. On this project's device machine (the lent H200) nothing is installed and nothing can be:
# it has no internet, and a virtual environment with a CUDA torch (several GB) cannot be carried
# (64 MiB travel with the working tree). Its image's python3 already holds a CUDA torch and every
# runtime dependency of dynamics (numpy, scipy, statsmodels, pandas, pyarrow, matplotlib, seaborn,
# tensorboard, typer, rich, tqdm, transformers, accelerate) plus peft and pytest, which is all these
# checks need; the repository is put on PYTHONPATH, not installed. The preflight below names any
# module that is missing; carry it as wheels (see the device tool's README: `pip download` here into
# an ignored .whl/ folder, `carry: [".whl"]`, `pip install --no-index --target` there).
# On any other GPU machine with a network: install the machine's CUDA build of torch first (e.g.
# `pip install torch --index-url https://download.pytorch.org/whl/cu128`), then `pip install -e .[test]`,
# which then keeps that torch.
#
# Device call (one call; leave time for the machine's start):
#   run(command="bash benchmarks/run_gpu.sh", timeout_s=590)
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-/tmp/dynamics_gpu_out}
mkdir -p "$OUT_DIR"

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  $PY - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
need = ["torch", "numpy", "scipy", "statsmodels", "pandas", "pyarrow", "matplotlib", "seaborn",
        "tensorboard", "typer", "rich", "tqdm", "transformers", "accelerate", "peft", "pytest"]
missing = []
for name in need:
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '?')}")
    except Exception as err:
        missing.append(f"{name} ({type(err).__name__}: {err})")
import torch
print("cuda available:", torch.cuda.is_available(), "| torch CUDA", torch.version.cuda)
if missing:
    print("MISSING:", "; ".join(missing))
import dynamics
print("dynamics", dynamics.__version__, "from", dynamics.__file__)
EOF
} 2>&1 | tee "$OUT_DIR/env.txt"

# The correctness test first: it is short, and a wrong probe makes the timings moot.
timeout 180 $PY -m pytest -q -p no:randomly -rfEsxX tests/signals/test_cuda_probe.py 2>&1 | tee "$OUT_DIR/cuda_test.txt"
test_rc=${PIPESTATUS[0]}

if [ -n "${BENCH_ARGS:-}" ]; then
  read -r -a bench_args <<< "$BENCH_ARGS"
elif [ -n "${QUICK:-}" ]; then
  bench_args=(--device cuda --quick)
else
  bench_args=(--device cuda --budget-s "${BUDGET:-360}")
fi
$PY benchmarks/bench_gpu.py "${bench_args[@]}" 2>&1 | tee "$OUT_DIR/bench_gpu.txt"
bench_rc=${PIPESTATUS[0]}

echo "cuda test exit status $test_rc, benchmark exit status $bench_rc; outputs in $OUT_DIR" | tee -a "$OUT_DIR/env.txt"
exit $(( test_rc != 0 || bench_rc != 0 ))
