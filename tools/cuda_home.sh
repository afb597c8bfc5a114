#!/usr/bin/env bash
# Prints the CUDA toolkit root (the folder whose bin/ holds the real nvcc and whose include/ holds
# cuda_runtime.h), or nothing. The nvcc on PATH may be a wrapper script elsewhere, which misleads
# torch's own detection, so candidates are checked for both files.
set -u
candidates=()
[ -n "${CUDA_HOME:-}" ] && candidates+=("$CUDA_HOME")
if nvcc_path=$(command -v nvcc 2>/dev/null); then
  candidates+=("$(dirname "$(dirname "$(readlink -f "$nvcc_path")")")")
  # a wrapper that execs the real compiler: follow the path it names
  real=$(grep -oE '/[^ "]*/bin/nvcc' "$nvcc_path" 2>/dev/null | head -n 1)
  [ -n "$real" ] && candidates+=("$(dirname "$(dirname "$real")")")
fi
candidates+=(/usr/local/cuda /usr/local/cuda-* /opt/cuda)
for dir in "${candidates[@]}"; do
  if [ -x "$dir/bin/nvcc" ] && [ -f "$dir/include/cuda_runtime.h" ]; then
    readlink -f "$dir"
    exit 0
  fi
done
