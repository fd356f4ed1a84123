#!/usr/bin/env bash
# One device call: carried wheels, JIT build, the full GPU suite (evidence
# gpu_tests.json), the fidelity harness (fidelity.json) and the decode benchmark
# (decode_bench.json) and the transformers generate benchmark (generate_bench.json), all under $OUT.
#   bash scripts/gpu_check.sh [tests|fidelity|bench|generate|prefill|bound|sanitize|first|second|all|none] [extra benchmark args...]
# (prefill_bench.json comes from the prefill stage, read_bound.json from the bound stage,
# sanitizer.json from the sanitize stage: compute-sanitizer's four tools, scripts/sanitize.py;
# run it in a call of its own, "all" leaves it out. On an H100 (NOTES v32) its coverage pass
# took ~40 s, memcheck 25 s, synccheck 15 s, racecheck 193 s, initcheck 6 s and its control 42 s;
# --tools and --carry split it over two calls into one file.
# Its logs stay in $LOGS: the device tool returns at most 8 files.)
# "all" takes 340 s on an H200 and 560-620 s on an H100, at the device tool's 600 s limit
# there: "first" (tests + bench, ~495 s on an H100) and "second" (fidelity + prefill +
# generate + bound) split it over two calls.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
# The device tool returns at most 8 files from $OUT: the evidence JSON goes there, logs to $LOGS.
LOGS=${LOGS:-/tmp/hydra_logs}
mkdir -p "$LOGS"
what=${1:-all}
shift || true
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# The Hub-form test and the generate benchmark need transformers >= 5.18 (README); the
# lent machines carry 5.17, so an evidence run without scripts/fetch_wheels.sh's wheels
# would fail a test for a reason that is not hydra's: say so first.
python3 - <<'PY' || true
import importlib.metadata as m
v = m.version("transformers") if any(d.metadata["Name"] == "transformers" for d in m.distributions()) else None
if v is None or tuple(int(x) for x in v.split(".")[:2]) < (5, 18):
    print(f"gpu_check: WARNING: transformers {v} here; the Hub-form test needs 5.18-5.20 "
          "(carry .whl from scripts/fetch_wheels.sh)")
PY
export PYTHONUNBUFFERED=1 FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee "$LOGS/nvidia_smi.txt"
start=$(date +%s)
python3 -c "import sys; sys.path.insert(0, 'torch-ext'); import hydra; assert hydra.ops is not None, 'build failed'" \
  2>&1 | tee "$LOGS/build.log"
echo "build+import: $(( $(date +%s) - start )) s"
rc=0
want() {  # whether stage $1 runs
  case "$what" in
    all) return 0 ;;
    first) [ "$1" = tests ] || [ "$1" = bench ] ;;
    second) [ "$1" = fidelity ] || [ "$1" = prefill ] || [ "$1" = generate ] || [ "$1" = bound ] ;;
    *) [ "$what" = "$1" ] ;;
  esac
}
if want tests; then
  python3 scripts/run_gpu_suite.py --out "$OUT/gpu_tests.json" 2>&1 | tee "$LOGS/tests.log" | grep -v "^$" | tail -60
  rc=${PIPESTATUS[0]}
fi
if want fidelity; then
  python3 benchmarks/fidelity.py --synthetic --device cuda --T 4096,16384,65536 \
    --evidence "$OUT/fidelity.json" 2>&1 | tee "$LOGS/fidelity.log" | tail -3
fi
if want bench; then
  python3 benchmarks/benchmark_hydra_decode.py --out "$OUT/decode_bench.json" "$@" 2>&1 | tee "$LOGS/bench.log" | tail -40
fi
if want prefill; then
  python3 benchmarks/benchmark_hydra_prefill.py --out "$OUT/prefill_bench.json" 2>&1 | tee "$LOGS/prefill.log" | tail -20
fi
if want generate; then
  python3 benchmarks/benchmark_generate.py --out "$OUT/generate_bench.json" 2>&1 | tee "$LOGS/generate.log" | tail -12
fi
if want bound; then
  python3 benchmarks/read_bound.py --out "$OUT/read_bound.json" 2>&1 | tee "$LOGS/bound.log" | tail -24
fi
if [ "$what" = sanitize ]; then
  python3 scripts/sanitize.py --out "$OUT/sanitizer.json" "$@" 2>&1 | tee "$LOGS/sanitize.log" | grep -v "^$" | tail -40
  rc=${PIPESTATUS[0]}
fi
exit $rc
