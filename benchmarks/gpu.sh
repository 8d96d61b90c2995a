#!/usr/bin/env bash
# MICO-scale throughput on one accelerator (written for one H200, <= 8 min).
#
#   bash benchmarks/gpu.sh            # on the GPU machine, from the repo root
#   SMOKE=1 bash benchmarks/gpu.sh    # tiny sizes on CPU: checks the script runs
#
# Needs requirements.txt's packages (torch not: `--no_reference`); the
# smoke run passes with jax 0.10.2 and with 0.11.2, an H200 image's jax.
#
# Runs MICO's CIFAR-10 CNN and Purchase-100 MLP at K in {1, 16, 64, 200},
# with and without DP-SGD (mico_jax only: `--no_reference`), then prints the
# projected wall time of training 200 MICO CIFAR-10 models at the full recipe
# (50 epochs over n = 50,000; non-DP batch 32, DP expected batch 512) from the
# measured per-model step times. Goal: <= 30 minutes (MICO: ~50 GPU-hours).
# Each (workload, K) is one process, so a failure (e.g. out of memory at a
# large K) costs only its own line; once BUDGET seconds (default 420) are
# spent the remaining runs are skipped, so the projection always prints.
# Never run in CI.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_bench}
mkdir -p "$OUT"
if [[ -n "${SMOKE:-}" ]]; then
  MODELS="1,2"; SIZES=(--smoke); LIMIT=300
else
  MODELS="1,16,64,200"
  # The MICO recipe's batches; steps kept few so the whole script fits 8 min.
  SIZES=(--steps=5 --repeats=2 --cnn_n=8192 --cnn_dp_batch=512)
  LIMIT=60
fi
BUDGET=${BUDGET:-420}
# One clear line, not 16 failed runs, where a requirement is missing (the
# H200 image has jax and flax but not dp-accounting, for one).
if ! error=$(python -c "import benchmarks.vs_reference" 2>&1); then
  echo "error: cannot import the benchmark (pip install -r requirements.txt):"\
    "$(tail -n 1 <<<"$error")" >&2
  exit 1
fi
python -c "import jax; print('devices:', jax.devices())"
for workload in cnn cnn_dp mlp mlp_dp; do
  for k in ${MODELS//,/ }; do
    left=$((BUDGET - SECONDS))
    if ((left < 20)); then
      echo "$workload K=$k: skipped (time budget of $BUDGET s spent)"
      continue
    fi
    timeout "$((left < LIMIT ? left : LIMIT))" \
      python -W ignore -m benchmarks.vs_reference \
      --no_reference --workloads="$workload" --models="$k" "${SIZES[@]}" \
      --out="$OUT/${workload}_$k.json" | tail -n 1 \
      || echo "$workload K=$k: exit status $? (124: timed out)"
  done
done
python - "$OUT" <<'PY'
import glob, json, math, sys
rows = {}
for path in glob.glob(f"{sys.argv[1]}/*.json"):
  for r in json.load(open(path))["rows"]:
    rows[r["workload"], r["models"]] = r
# MICO CIFAR-10: 50 epochs over n = 50,000; DP: q = 1 / ceil(n / 512).
steps = {"cnn": 50 * math.ceil(50_000 / 32), "cnn_dp": 50 * math.ceil(50_000 / 512)}
for workload, num_steps in steps.items():
  done = [k for (w, k) in rows if w == workload]
  if not done:
    print(f"{workload}: no measurement")
    continue
  k = min(done, key=lambda k: rows[workload, k]["seconds_per_step_per_model"])
  per_model = rows[workload, k]["seconds_per_step_per_model"]
  minutes = 200 * num_steps * per_model / 60
  print(f"{workload}: 200 MICO CIFAR-10 models x {num_steps} steps at the"
        f" K = {k} rate, the fastest a model ({per_model * 1e3:.2f}"
        f" ms/step/model; batch {rows[workload, k]['batch']}):"
        f" {minutes:.1f} min"
        f" (goal <= 30: {'met' if minutes <= 30 else 'NOT met'})")
PY
