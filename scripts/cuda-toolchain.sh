#!/usr/bin/env bash
# What a `--features cuda` build needs on a machine without the CUDA toolkit, fetched from PyPI
# by package name and pinned to CUDA 13.0 (the GPU machines' driver supports it):
#
#   - nvcc and the headers candle-kernels compiles its PTX with (nvidia-cuda-nvcc, -crt, -nvvm,
#     -runtime for cuda_fp16.h, -cccl for <nv/target>), installed with --no-deps into
#     .cache/cuda-13.0 (git-ignored);
#   - a copy of cudarc, the crate candle reaches the CUDA libraries through, that loads them at
#     run time (its own `dynamic-loading` mode) instead of linking them, because candle asks for
#     `dynamic-linking`: a linked binary cannot even start where there is no driver (exit 127,
#     "libcuda.so.1: cannot open shared object file"), so `--device cpu` would fail too. The copy
#     is the registry's source with scripts/cuda/cudarc-dynamic-loading.patch applied; nothing
#     of cudarc is committed. No CUDA library is needed at link time, so no stubs either.
#
#   scripts/cuda-toolchain.sh          install (idempotent: what is complete is kept)
#   eval "$(scripts/cuda-toolchain.sh --env)"   the variables scripts/build-cuda.sh sets
#
# Prints, last, the lines `export ...` that put nvcc on PATH and name the patched cudarc.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
dir=${FAM_CUDA_DIR:-$root/.cache/cuda-13.0}
case $dir in /*) ;; *) dir=$root/$dir ;; esac

# One requirement a line, each pinned; installed with --no-deps (nvidia-cuda-nvcc would pull a
# newer crt and nvvm otherwise).
requirements='
nvidia-cuda-nvcc==13.0.88
nvidia-cuda-crt==13.0.88
nvidia-nvvm==13.0.88
nvidia-cuda-runtime==13.0.96
nvidia-cuda-cccl==13.0.85
'
# The compute capability the PTX is built for: 90 is the H100/H200 (Hopper). Override for
# another GPU (`nvidia-smi --query-gpu=compute_cap --format=csv` prints it, without the dot).
cap=${CUDA_COMPUTE_CAP:-90}

env_lines() {
    echo "export PATH=\"$dir/site/nvidia/cu13/bin:\$PATH\""
    # candle-kernels links `-lcudart` for its statically compiled MoE kernels. link/ holds
    # only libcudart.a (the wheel's libcudart_static.a), so the linker takes the static CUDA
    # runtime, which opens the driver itself when first used: no binary needs libcudart.so
    # at start-up. LIBRARY_PATH reaches the linker and, unlike RUSTFLAGS, leaves cargo's
    # fingerprints (and so a shared target folder) alone.
    echo "export LIBRARY_PATH=\"$dir/link\${LIBRARY_PATH:+:\$LIBRARY_PATH}\""
    echo "export CUDA_COMPUTE_CAP=$cap"
    echo "export FAM_CUDARC=\"$dir/cudarc\""
}
if [[ "${1:-}" == "--env" ]]; then env_lines; exit 0; fi

stamp=$dir/site/.complete
want=$(echo "$requirements" | sed '/^$/d' | sort | sha256sum | cut -c1-16)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
    echo "cuda toolchain: $dir/site is complete" >&2
else
    echo "cuda toolchain: installing nvcc and headers into $dir/site" >&2
    rm -rf "$dir/site"
    mkdir -p "$dir/site"
    # shellcheck disable=SC2086
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --no-deps \
        --target "$dir/site" $requirements
    echo "$want" >"$stamp"
fi
mkdir -p "$dir/link"
rm -f "$dir/link/libcudart.so"
ln -sf "$dir/site/nvidia/cu13/lib/libcudart_static.a" "$dir/link/libcudart.a"
nvcc=$dir/site/nvidia/cu13/bin/nvcc
"$nvcc" --version | grep -q "release 13.0" ||
    { echo "cuda toolchain: $nvcc is not CUDA 13.0" >&2; exit 1; }

# The patched cudarc, at the version Cargo.lock pins.
ver=$(awk '/^name = "cudarc"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)
[[ -n $ver ]] || { echo "cuda toolchain: Cargo.lock names no cudarc" >&2; exit 1; }
patch_file=$root/scripts/cuda/cudarc-dynamic-loading.patch
pstamp=$dir/cudarc/.fam-patched
pwant="$ver $(sha256sum "$patch_file" | cut -c1-16)"
if [[ -f $pstamp && $(cat "$pstamp") == "$pwant" ]]; then
    echo "cuda toolchain: cudarc $ver (run-time loading) is ready" >&2
else
    cargo fetch --quiet >&2
    cargo_home=${CARGO_HOME:-$HOME/.cargo}
    src=$(ls -d "$cargo_home"/registry/src/*/"cudarc-$ver" 2>/dev/null | head -n1)
    [[ -d $src ]] || { echo "cuda toolchain: cudarc $ver not in $cargo_home/registry/src" >&2; exit 1; }
    rm -rf "$dir/cudarc"
    mkdir -p "$dir"
    cp -r "$src" "$dir/cudarc"
    patch --quiet -d "$dir/cudarc" -p1 <"$patch_file" ||
        { echo "cuda toolchain: $patch_file does not apply to cudarc $ver" >&2; exit 1; }
    echo "$pwant" >"$pstamp"
    echo "cuda toolchain: cudarc $ver patched to load the CUDA libraries at run time" >&2
fi
env_lines
