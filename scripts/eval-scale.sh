#!/usr/bin/env bash
# Faithfulness at scale (docs/evaluation.md): builds the evaluation sets, then runs
# `fam-cli eval` on each model with both removals (blur, mean colour), 95% bootstrap
# intervals on every number. Everything lands in .cache/eval-scale/ (EVAL_DIR): the data,
# the pipelines pointing at it, and per run eval.json, eval-curves.png and table.txt.
#
#   scripts/eval-scale.sh                 # every set below
#   SETS="fashion-protonet" scripts/eval-scale.sh
#   SETS=natural-imagenet REMOVALS=blur RISE_MASKS=250 TAG=lit \
#     METHODS=decomposition,point-specific,sbsm,corrrise scripts/eval-scale.sh
#
# Sets (SETS, space separated):
#   fashion-protonet   ProtoNet Conv-4, Fashion-MNIST novel classes, 5-way 5-shot, 200
#                      queries per class: ITEMS (1,000) query-vs-prototype items, Euclidean
#   fashion-simclr     SimCLR Conv-4, Fashion-MNIST, kNN (k = 5) over a 200-image bank: ITEMS
#                      items, cosine
#   natural-imagenet   MobileNetV2 (ImageNet), NATURAL (150) derived queries against the ten
#                      photos (scripts/make-derived-eval-set.py), top 1, cosine: each query
#                      and its hit are items (300)
#   natural-faces      MobileFaceNet, NATURAL derived queries against the face crops, cosine
# Needs: Debian's dataset-fashion-mnist and the fetched models (scripts/fetch-models.sh), the
# zoo venv's Pillow for the derived sets (scripts/zoo-env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
dir=${EVAL_DIR:-.cache/eval-scale}
ITEMS=${ITEMS:-1000}
NATURAL=${NATURAL:-150}
STEPS=${STEPS:-16}
SETS=${SETS:-fashion-protonet fashion-simclr natural-imagenet natural-faces}
REMOVALS=${REMOVALS:-blur mean}
RISE_MASKS=${RISE_MASKS:-500}   # masks per CorrRISE map
METHODS=${METHODS:-}            # e.g. "decomposition,sbsm" (FAM always); empty: all
TAG=${TAG:-}                    # appended to the result folders' names
mkdir -p "$dir/results"
dir=$(cd "$dir" && pwd)
py=${PYTHON:-.cache/zoo-venv/bin/python}

# FAM_CLI and TRAIN: binaries built elsewhere (the plugins beside fam-cli), so that a long
# run does not pick up a rebuild of this tree.
if [ -z "${FAM_CLI:-}" ]; then
  cargo build --release -q
  cargo build --release -q -p fam-plugin-fewshot --example train
fi
fam=${FAM_CLI:-$root/target/release/fam-cli}
train=${TRAIN:-$root/target/release/examples/train}

# A copy of a committed pipeline with its paths made absolute and some lines replaced.
pipeline() { # SOURCE OUT [sed expressions...]
  local src=$1 out=$2
  shift 2
  sed -e "s#\"\\.\\./#\"$root/#g" "$@" "$src" >"$out"
}

# A retrieval pipeline searching a derived set (queries/ against gallery/), top 1.
derived() { # SOURCE OUT SET-FOLDER
  pipeline "$1" "$2" \
    -e "s#^queries = .*#queries = \"$dir/$3/queries\"#" \
    -e "s#^gallery = .*#gallery = \"$dir/$3/gallery\"#" \
    -e "s#^top_k = .*#top_k = 1#" \
    -e "s#^batch_size = .*#batch_size = 32#"
}

# Fashion-MNIST: a 5-way 5-shot episode of the novel classes with 200 queries per class.
if [[ " $SETS " == *" fashion-"* ]] && [ ! -f "$dir/fashion/.done" ]; then
  rm -rf "$dir/fashion"
  "$train" export-fashion --queries 200 --out "$dir/fashion"
  touch "$dir/fashion/.done"
fi
if [[ " $SETS " == *" natural-imagenet "* ]] && [ ! -f "$dir/natural/.done" ]; then
  "$py" scripts/make-derived-eval-set.py "$dir/natural" "$NATURAL"
fi
if [[ " $SETS " == *" natural-faces "* ]] && [ ! -f "$dir/faces/.done" ]; then
  "$py" scripts/make-derived-eval-set.py "$dir/faces" "$NATURAL" data/faces/gallery 0.85
fi

for set in $SETS; do
  p=$dir/$set.toml
  case $set in
    fashion-protonet)
      pipeline pipelines/fewshot-fashion.toml "$p" \
        -e "s#$root/data/fashion/episode#$dir/fashion/episode#g"
      items=$ITEMS ;;
    fashion-simclr)
      pipeline pipelines/contrastive-fashion.toml "$p" \
        -e "s#$root/data/fashion/bank#$dir/fashion/bank#" \
        -e "s#$root/data/fashion/queries#$dir/fashion/episode/query#"
      items=$ITEMS ;;
    natural-imagenet)
      derived pipelines/retrieval-imagenet.toml "$p" natural
      items=$((2 * NATURAL)) ;;
    natural-faces)
      derived pipelines/retrieval-faces.toml "$p" faces
      items=$((2 * NATURAL)) ;;
    *) echo "unknown set $set" >&2; exit 2 ;;
  esac
  for removal in $REMOVALS; do
    out=$dir/results/$set-$removal${TAG:+-$TAG}
    echo "== $set, removal $removal, at most $items items, $STEPS steps, ${METHODS:-all methods}"
    start=$(date +%s)
    "$fam" -q eval "$p" --steps "$STEPS" --max-items "$items" --removal "$removal" \
      --rise-masks "$RISE_MASKS" ${METHODS:+--methods "$METHODS"} \
      --output "$out" | tee "$out.txt"
    echo "($(( $(date +%s) - start )) s)" | tee -a "$out.txt"
  done
done
echo "results: $dir/results"
