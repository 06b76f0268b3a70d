#!/usr/bin/env bash
# Creates the Python environment that builds the ONNX model zoo (scripts/make-zoo.py) and runs
# the side-by-side benchmark (scripts/bench-zoo.py): a virtualenv at .cache/zoo-venv (git-ignored)
# with every package pinned, fetched from PyPI by package name.
#
#   scripts/zoo-env.sh            create or complete it (idempotent: a complete one is kept)
#   scripts/zoo-env.sh --force    remove it and build it again
#   ZOO_VENV=DIR scripts/zoo-env.sh   another location
#
# Prints the venv's python path on its last line, so `PY=$(scripts/zoo-env.sh | tail -n1)` works.
#
# PyPI's Linux torch wheel is the CUDA build; its libraries (libtorch_cuda.so, libtorch_python.so)
# link against the CUDA runtime, cuBLAS, cuDNN, cuFFT, cuSPARSE(Lt), cuFile, CUPTI, NCCL, NVRTC and
# nvshmem at load time, so `import torch` needs those wheels even on a CPU-only machine (checked:
# without them it fails with "libcudart.so.13: cannot open shared object file", and without CUPTI
# with "libcupti.so.13"). Everything is therefore installed with --no-deps from the exact list
# below, which leaves out what torch names but never loads on the CPU: triton (1 GiB, only for
# torch.compile's GPU kernels), cuSOLVER (loaded lazily, CUDA linear algebra only), NVTX, CCCL
# (headers) and cuda-bindings. That saves about 1.3 GiB of the 5.4 GiB a plain `pip install torch`
# takes. The torch.onnx exporters (TorchScript and dynamo) and onnxruntime run on the CPU.
#
# Measured on the 2-vCPU dev VM (2026-12-01), from nothing (empty pip cache): 82 s and 122 s
# (the second with another build running), 4.7 GiB on disk; an existing venv is checked in 5 s.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${ZOO_VENV:-.cache/zoo-venv}
case $venv in /*) ;; *) venv=$PWD/$venv ;; esac
py=$venv/bin/python

# One requirement a line, each pinned. Order does not matter (installed with --no-deps).
requirements='
torch==2.15.0
torchvision==0.29.2
nvidia-cublas==13.4.1.3
nvidia-cuda-cupti==13.2.86
nvidia-cuda-nvrtc==13.2.86
nvidia-cuda-runtime==13.2.86
nvidia-cudnn-cu13==9.26.0.51
nvidia-cufft==12.2.0.57
nvidia-cufile==1.17.1.22
nvidia-cusparse==12.7.10.12
nvidia-cusparselt-cu13==0.8.1
nvidia-nccl-cu13==2.30.7
nvidia-nvjitlink==13.5.37
nvidia-nvshmem-cu13==3.7.2
filelock==4.3.1
typing_extensions==4.16.0
setuptools==84.2.1
sympy==1.14.0
mpmath==1.3.0
networkx==3.6.1
Jinja2==3.1.6
MarkupSafe==3.0.4
fsspec==2026.9.0
numpy==2.4.6
pillow==13.0.0
onnx==1.23.2
onnx-ir==1.1.0
onnxruntime==1.32.0
onnxscript==0.7.2
ml_dtypes==0.6.0
protobuf==7.36.2
flatbuffers==25.12.19
packaging==26.4
grad-cam==1.5.7
ttach==0.0.3
tqdm==4.70.1
opencv-python-headless==5.0.0.93
matplotlib==3.11.2
contourpy==1.3.3
cycler==0.12.1
fonttools==4.68.0
kiwisolver==1.5.1
pyparsing==3.3.3
python-dateutil==4.0.0
tzdata==2026.6
scikit-learn==1.9.1
scipy==1.17.1
joblib==1.6.0
threadpoolctl==3.8.0
cloudpickle==3.1.3
narwhals==2.29.0
'
stamp_value=$(printf '%s' "$requirements" | sha256sum | cut -d' ' -f1)
stamp=$venv/.zoo-env-stamp

check() {
    "$py" - <<'PY'
import torch, torchvision, onnx, onnxruntime, onnxscript, numpy, PIL, cv2  # noqa: F401
import pytorch_grad_cam  # noqa: F401
from pytorch_grad_cam.utils.image import show_cam_on_image  # noqa: F401
net = torchvision.models.resnet18().eval()
with torch.no_grad():
    assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 1000)
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, onnx {onnx.__version__}, "
      f"onnxruntime {onnxruntime.__version__}, onnxscript {onnxscript.__version__}", flush=True)
PY
}

if [ "${1:-}" = "--force" ]; then
    rm -rf "$venv"
fi
if [ -x "$py" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$stamp_value" ] && check >&2; then
    echo "zoo-env: $venv is complete" >&2
    echo "$py"
    exit 0
fi

start=$(date +%s)
[ -x "$py" ] || python3 -m venv "$venv"
req=$(mktemp)
trap 'rm -f "$req"' EXIT
printf '%s\n' "$requirements" | sed '/^$/d' >"$req"
"$py" -m pip install --quiet --disable-pip-version-check --no-deps --no-input -r "$req" >&2
check >&2
echo "$stamp_value" >"$stamp"
echo "zoo-env: $venv ready in $(( $(date +%s) - start )) s, $(du -sh "$venv" | cut -f1)" >&2
echo "$py"
