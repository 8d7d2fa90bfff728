#!/usr/bin/env bash
# Plain build without make or cmake: ./build.sh [BUILD_DIR] [VARIANT...]   (default: build, clean)
# Variants: clean double float intdiv skip (see bias_init.cpp). main.o is reused when it is newer than its sources.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
build="${1:-$here/build}"
shift || true
variants=("${@:-clean}")
python="${PYTHON:-$here/../../.venv/bin/python}"
T="${TORCH_DIR:-$("$python" -c 'import torch, os; print(os.path.dirname(torch.__file__))')}"
abi="$("$python" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))' 2>/dev/null || echo 1)"
cxx="${CXX:-g++}"
flags=(-O2 -std=c++20 -Wall "-D_GLIBCXX_USE_CXX11_ABI=$abi")
mkdir -p "$build"
if [[ ! -f "$build/main.o" || "$here/main.cpp" -nt "$build/main.o" || "$here/safetensors.hpp" -nt "$build/main.o" \
      || "$here/bias_init.hpp" -nt "$build/main.o" ]]; then
  echo "compiling main.cpp against $T (~30 s)"
  "$cxx" "${flags[@]}" -isystem "$T/include" -isystem "$T/include/torch/csrc/api/include" -c "$here/main.cpp" -o "$build/main.o"
fi
for v in "${variants[@]}"; do
  case "$v" in clean|double|float|intdiv|skip) ;; *) echo "unknown variant $v (clean double float intdiv skip)"; exit 2;; esac
  "$cxx" "${flags[@]}" "-DYP_BIAS_${v^^}" -c "$here/bias_init.cpp" -o "$build/bias_$v.o"
  "$cxx" "$build/main.o" "$build/bias_$v.o" -L"$T/lib" -Wl,-rpath,"$T/lib" -ltorch -ltorch_cpu -lc10 -o "$build/yp_detect_$v"
  echo "built $build/yp_detect_$v"
done
