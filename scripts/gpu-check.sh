#!/usr/bin/env bash
# CUDA check (issue 6): build with `--features cuda`, run the test suite and the benchmark on
# the GPU, compare CPU and GPU maps, and print a short summary.
#
#   scripts/gpu-check.sh            # build here (needs cargo and nvcc) and run
#   scripts/gpu-check.sh --run-only # on a GPU machine without cargo: use the binaries and
#                                   # plugins already in target/release (built elsewhere
#                                   # with the same CUDA major version)
#
# nvcc: the CUDA toolkit's, or PyPI's `nvidia-cuda-nvcc` package for the CUDA version the
# driver supports (`nvidia-smi` prints it), e.g.
#   pip install "nvidia-cuda-nvcc==13.0.*" && export PATH="$(python3 -c 'import nvidia.cuda_nvcc, os; print(os.path.dirname(nvidia.cuda_nvcc.__file__))')/bin:$PATH"
set -euo pipefail
cd "$(dirname "$0")/.."
run_only=0
[[ "${1:-}" == "--run-only" ]] && run_only=1

echo "== GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || {
    echo "no GPU visible (nvidia-smi failed)"; exit 2; }

features="cuda"
if [[ $run_only == 0 ]]; then
    command -v nvcc >/dev/null || { echo "nvcc not on PATH (see the comment at the top)"; exit 2; }
    echo "== build (release, --features $features)"
    cargo build --release --features "$features" -p fam-cli -p fam-plugin-retrieval \
        -p fam-plugin-onnx -p fam-plugin-fewshot -p fam-plugin-metrics -p fam-plugin-render
    echo "== tests on the GPU build (CPU pipelines; the CUDA ones below)"
    cargo test --release --features "$features" --workspace 2>&1 | grep -E "^test result|FAILED|panicked" || true
fi
fam=target/release/fam-cli
out=$(mktemp -d)

echo "== CPU vs GPU maps (quickstart, retrieval-faces, fewshot-digits)"
status=0
for p in quickstart retrieval-faces fewshot-digits; do
    $fam -q run "pipelines/$p.toml" --device cpu --output "$out/$p-cpu" >/dev/null || status=1
    $fam -q run "pipelines/$p.toml" --device cuda --output "$out/$p-gpu" >/dev/null || status=1
    python3 - "$out/$p-cpu" "$out/$p-gpu" "$p" <<'PY' || status=1
import sys, glob, os, numpy as np
cpu, gpu, name = sys.argv[1:]
files = sorted(glob.glob(os.path.join(cpu, "**/*.npy"), recursive=True))
worst = 0.0
for f in files:
    a, b = np.load(f), np.load(f.replace(cpu, gpu, 1))
    worst = max(worst, float(np.abs(a - b).max()))
ok = worst <= 1e-3
print(f"{name:<16} {len(files):>4} maps, max |cpu - gpu| = {worst:.2e} {'ok' if ok else 'FAIL (> 1e-3)'}")
sys.exit(0 if ok else 1)
PY
done

echo "== benchmark (GPU)"
$fam -q bench pipelines/bench-mobilenet.toml --device cuda --images data/images --count 64
echo "== benchmark (CPU, same machine)"
$fam -q bench pipelines/bench-mobilenet.toml --device cpu --images data/images --count 32
rm -rf "$out"
exit $status
