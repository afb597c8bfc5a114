#!/usr/bin/env bash
# `make gpu-check`: everything CUDA in one command, on a machine with a CUDA GPU, in about 10
# minutes. It builds the operators for this GPU's own architecture, runs every test marked cuda
# (the CMake build's C++ test with CUDA among them; a skipped one counts as a failure), the CUDA
# rows of the operator and stage-2 step benchmarks (benchmarks/speed.py) and `scop demo --device
# cuda`, and writes one summary, runs/gpu-check/summary.md, with each step's log beside it.
# Without a GPU it says so in one line and exits 1 before doing anything else.
#
#   PY=.venv/bin/python tools/gpu_check.sh        # what `make gpu-check` runs
#   GPU_CHECK_OUT=/tmp/gc tools/gpu_check.sh      # another output folder
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${GPU_CHECK_OUT:-runs/gpu-check}
BUDGET=${GPU_CHECK_BUDGET:-570}  # seconds for all steps: the 10-minute promise, less start-up

# The GPU as torch sees it, read before anything is built or written.
if [[ ! -x $PY ]]; then
  echo "gpu-check: no Python at $PY (run make venv, or set PY)" >&2
  exit 1
fi
if ! probe=$("$PY" -c 'import sys, torch
sys.exit(1) if not torch.cuda.is_available() else print("%d.%d" % torch.cuda.get_device_capability(), torch.cuda.device_count())' 2>/dev/null); then
  echo "gpu-check: no CUDA GPU visible to torch ($PY); nothing was run" >&2
  exit 1
fi
read -r cap gpus <<<"$probe"
jobs=${MAX_JOBS:-$(nproc)}

mkdir -p "$OUT"
summary="$OUT/summary.md"
start=$SECONDS
failed=0
names=() verdicts=() secs=()
# row NAME VERDICT SECONDS: one line of the summary's table.
row() { names+=("$1"); verdicts+=("$2"); secs+=("$3"); }

# run NAME CAP COMMAND...: COMMAND with its output in $OUT/NAME.log, stopped after CAP seconds or
# when the overall budget runs out, whichever comes first; one row of the summary.
run() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET - (SECONDS - start)))
  ((cap > left)) && cap=$left
  if ((cap <= 0)); then
    row "$name" "not run: the ${BUDGET} s budget was spent" 0
    failed=1
    return
  fi
  local t0=$SECONDS status
  timeout --signal=INT --kill-after=10 "$cap" "$@" >"$OUT/$name.log" 2>&1
  status=$?
  local took=$((SECONDS - t0)) verdict="ok"
  if ((status == 124)); then verdict="timed out after ${cap} s"; elif ((status != 0)); then verdict="failed (exit $status)"; fi
  [[ $verdict == ok ]] || failed=1
  row "$name" "$verdict" "$took"
  echo "gpu-check: $name: $verdict (${took} s)" >&2
}

# fail_last REASON: a step that exited 0 without doing its CUDA work has failed all the same.
fail_last() {
  verdicts[-1]="failed: $1"
  failed=1
  echo "gpu-check: ${names[-1]}: $1" >&2
}

cuda_home=$(tools/cuda_home.sh)
if [[ -z $cuda_home ]]; then
  row build "failed: no CUDA toolkit (nvcc and cuda_runtime.h) found; set CUDA_HOME" 0
  failed=1
else
  # --force: an in-place build for another architecture must not be reused
  run build 240 env FORCE_CUDA=1 CUDA_HOME="$cuda_home" TORCH_CUDA_ARCH_LIST="$cap" MAX_JOBS="$jobs" \
    "$PY" setup.py build_ext --inplace --force
  run build-check 30 "$PY" -c "import sys, scop_ext; info = scop_ext.build_info(); print(info); sys.exit(0 if info['cuda'] and info['cuda_available'] else 1)"
fi
# Every test marked cuda (tests/test_markers.py checks that every test named for CUDA is), the CMake
# build with CUDA and its C++ test included; those needing two GPUs only where there are two. Any
# skip is a failure: here a skipped CUDA test is one that never ran.
marks="cuda"
((gpus < 2)) && marks="cuda and not multi_gpu"
run tests 330 env SCOP_TEST_CMAKE_CUDA=1 CUDA_HOME="$cuda_home" TORCH_CUDA_ARCH_LIST="$cap" MAX_JOBS="$jobs" \
  "$PY" -m pytest -q -ra -m "$marks" -p no:cacheprovider
tally=$(grep -E "[0-9]+ (passed|failed|skipped|errors?|deselected).* in [0-9.]+s" "$OUT/tests.log" 2>/dev/null | tail -n 1)
[[ $tally =~ ([0-9]+)\ skipped ]] && fail_last "${BASH_REMATCH[1]} CUDA tests were skipped (see tests.log)"
rm -f "$OUT/speed.md"
run benchmarks 150 "$PY" benchmarks/speed.py --devices cuda --parts ops,step --quick --write "$OUT/speed.md"
[[ -s $OUT/speed.md ]] || fail_last "no CUDA rows measured (see benchmarks.log)"
run demo 150 "$PY" -m scop_ext.cli demo --device cuda --out "$OUT/demo"

{
  echo "# gpu-check"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), git $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $((SECONDS - start)) s in all."
  "$PY" -c 'import torch; p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, CUDA {torch.version.cuda}")'
  echo "Built for TORCH_CUDA_ARCH_LIST=$cap; CUDA_HOME=${cuda_home:-none}; tests: -m \"$marks\" ($gpus GPU(s))."
  echo
  echo "| step | result | seconds |"
  echo "|---|---|---|"
  for i in "${!names[@]}"; do echo "| ${names[i]} | ${verdicts[i]} | ${secs[i]} |"; done
  echo
  echo "## tests"
  echo
  [[ -f $OUT/tests.log ]] && grep -E "passed|failed|error|skipped|^(FAILED|ERROR|SKIPPED)" "$OUT/tests.log" | tail -n 30
  echo
  echo "## benchmarks"
  echo
  [[ -f $OUT/speed.md ]] && cat "$OUT/speed.md"
  echo
  echo "## demo"
  echo
  [[ -f $OUT/demo.log ]] && echo '```' && tail -n 20 "$OUT/demo.log" && echo '```'
} >"$summary"
echo "gpu-check: $( ((failed)) && echo 'FAILED' || echo 'all passed'); summary in $summary" >&2
exit $failed
