#!/usr/bin/env bash
# Compile-only check of the CUDA kernels (no GPU needed; `make cuda-check`, tests/ops/test_cuda_compile.py).
#
# 1. Every csrc/cuda/*.cu with plain `nvcc -c` for sm_90 (H100/H200 SASS) and for compute_75 PTX
#    (the oldest architecture CUDA 13 targets; the driver JIT-compiles it for any newer GPU).
#    The .cu files are torch-free, so this needs only the CUDA toolkit.
# 2. The torch binding (binding.cpp) with the host compiler in -fsyntax-only mode, when a Python
#    with torch is found. A CPU torch wheel ships the c10/cuda headers except the generated
#    c10/cuda/impl/cuda_cmake_macros.h; this script then writes that one-line header
#    (C10_CUDA_BUILD_SHARED_LIBS, what a CUDA build of torch generates) into a temporary
#    include directory. Linking needs a CUDA build of torch, which only GPU machines have
#    (bissl.ops._backends.load_cuda_extension).
#
# Environment: NVCC (default nvcc), CXX (default c++), PYTHON (default python3), JOBS.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
csrc="$(dirname "$here")"
nvcc="${NVCC:-nvcc}"
cxx="${CXX:-c++}"
python="${PYTHON:-python3}"
jobs="${JOBS:-$(nproc 2>/dev/null || echo 2)}"

if ! command -v "$nvcc" >/dev/null 2>&1; then
  echo "cuda-check: nvcc not found (set NVCC=/path/to/nvcc or install the CUDA toolkit)" >&2
  exit 2
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "cuda-check: $("$nvcc" --version | tail -n 1)"
shopt -s nullglob
sources=("$here"/*.cu)
if [ "${#sources[@]}" -eq 0 ]; then
  echo "cuda-check: no .cu files in $here" >&2
  exit 1
fi

# One job per (source, architecture); xargs -P runs them in parallel and fails if any fails.
for src in "${sources[@]}"; do
  name="$(basename "$src" .cu)"
  printf '%s\0%s\0%s\0' "$src" "-gencode=arch=compute_90,code=sm_90" "$tmp/$name.sm_90.o"
  printf '%s\0%s\0%s\0' "$src" "-gencode=arch=compute_75,code=compute_75" "$tmp/$name.compute_75.o"
done | xargs -0 -n 3 -P "$jobs" sh -c '
  "$0" -std=c++17 -O3 --Werror all-warnings -Xcompiler -Wall -I"$1" "$3" -c "$2" -o "$4" \
    && echo "cuda-check: ok   $(basename "$2") $3" \
    || { echo "cuda-check: FAIL $(basename "$2") $3" >&2; exit 255; }
' "$nvcc" "$csrc"

torch_includes="$("$python" -c 'from torch.utils.cpp_extension import include_paths; print(" ".join(include_paths()))' 2>/dev/null || true)"
if [ -z "$torch_includes" ]; then
  echo "cuda-check: skipped binding.cpp ($python cannot import torch)"
  exit 0
fi
cuda_include=""
for dir in "${CUDA_HOME:-}/include" "$("$nvcc" --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -n 1)" /usr/local/cuda/include; do
  if [ -n "$dir" ] && [ -f "$dir/cuda_runtime_api.h" ]; then cuda_include="$dir"; break; fi
done
if [ -z "$cuda_include" ]; then
  echo "cuda-check: cannot find cuda_runtime_api.h (set CUDA_HOME)" >&2
  exit 1
fi
flags=()
for dir in $torch_includes; do flags+=("-I$dir"); done
if ! find $torch_includes -path '*c10/cuda/impl/cuda_cmake_macros.h' 2>/dev/null | grep -q .; then
  mkdir -p "$tmp/shim/c10/cuda/impl"
  echo '#define C10_CUDA_BUILD_SHARED_LIBS' > "$tmp/shim/c10/cuda/impl/cuda_cmake_macros.h"
  flags+=("-I$tmp/shim")
fi
"$cxx" -std=c++20 -fsyntax-only -Wall -Werror -I"$csrc" -I"$cuda_include" "${flags[@]}" "$here/binding.cpp"
echo "cuda-check: ok   binding.cpp (syntax and types against torch $("$python" -c 'import torch; print(torch.__version__)'))"
