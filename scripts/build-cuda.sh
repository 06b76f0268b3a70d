#!/usr/bin/env bash
# Builds (or tests) fam with CUDA, `--features cuda`, on any Linux machine: a GPU is not
# needed to build, and the result runs on the CPU where there is none (`--device cuda` then
# fails with exit code 2 and says which CUDA library is missing).
#
#   scripts/build-cuda.sh                      cargo build --release (fam-cli and every plugin)
#   scripts/build-cuda.sh test                 the test suite of the cuda build (test profile)
#   scripts/build-cuda.sh build -p fam-cli     any cargo subcommand and its arguments
#
# The toolchain comes from scripts/cuda-toolchain.sh (nvcc 13.0 and headers from PyPI, and a
# cudarc that loads the CUDA libraries at run time). Output goes to target/cuda, beside the CPU
# build's target/{debug,release}, so neither build overwrites the other:
#   target/cuda/release/fam-cli and its plugins (libfam_plugin_*.so), which must all come from
#   the same build (the ABI fingerprint refuses a CPU plugin in a cuda fam-cli, and back).
# CUDA_COMPUTE_CAP (default 90, Hopper) picks the GPU the kernels are compiled for.
set -euo pipefail
cd "$(dirname "$0")/.."
toolchain=$(scripts/cuda-toolchain.sh)
eval "$(echo "$toolchain" | grep '^export ')"
target=${FAM_CUDA_TARGET_DIR:-target/cuda}

# cargo writes the patched cudarc (a path, no checksum) into Cargo.lock; the committed lock
# file names the registry's, so it is put back however the build ends.
saved=$(mktemp)
cp Cargo.lock "$saved"
trap 'cp "$saved" Cargo.lock; rm -f "$saved"' EXIT

cmd=${1:-build}
[[ $# -gt 0 ]] && shift
args=("$@")
if [[ $cmd == build && ${#args[@]} -eq 0 ]]; then args=(--release); fi
# Every package with the feature: candle is compiled once, with CUDA, for the host and all
# plugins alike.
case " ${args[*]} " in
    *" -p "* | *" --package "*) ;;
    *) args=(--workspace "${args[@]}") ;;
esac
echo "cuda build: nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), compute capability $CUDA_COMPUTE_CAP, target dir $target" >&2
cargo --config "patch.crates-io.cudarc.path=\"$FAM_CUDARC\"" "$cmd" --features cuda \
    --target-dir "$target" "${args[@]}"
