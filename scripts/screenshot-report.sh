#!/usr/bin/env bash
# Screenshots of a run's report pages in headless Chromium (Debian's `chromium`): the run's
# page (index.html) and one comparison's own page, optionally with a location chosen, as the
# pictures in README.md and docs/ were made.
#
#   scripts/screenshot-report.sh RUN_DIR PREFIX [ID [LOCATION]]
#
#   RUN_DIR   a run's output folder, written with the `html` renderer
#   PREFIX    the PNGs' path prefix: PREFIX-index.png and PREFIX-compare.png
#   ID        the comparison whose page to take (default: the first of compare/)
#   LOCATION  a location to choose on that page, e.g. `query=3,4` (row 3, column 4 of the
#             query's feature map; the page reads it from the address)
#
# Example (the pictures in docs/architecture.md):
#   target/release/fam-cli run pipelines/retrieval-imagenet.toml
#   scripts/screenshot-report.sh out/retrieval-imagenet docs/images/report-retrieval \
#     chelsea_mirror_hit-01_chelsea query=2,4
set -euo pipefail
[ $# -ge 2 ] || { sed -n 2,17p "$0" >&2; exit 2; }
run=$(cd "$1" && pwd)
prefix=$2
id=${3:-}
location=${4:-}
browser=${FAM_CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}
[ -n "$browser" ] || { echo "headless Chromium is needed: apt-get install chromium" >&2; exit 1; }
[ -f "$run/index.html" ] || { echo "$run/index.html: no report (add the html renderer)" >&2; exit 1; }
if [ -z "$id" ]; then
  first=$(find "$run/compare" -name '*.html' 2>/dev/null | sort | head -n1)
  [ -n "$first" ] || { echo "$run/compare: no comparison pages" >&2; exit 1; }
  id=$(basename "$first" .html)
fi
page=$run/compare/$id.html
[ -f "$page" ] || { echo "$page: no such comparison page" >&2; exit 1; }
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
shot() { # URL OUT WIDTH HEIGHT
  "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$profile" --window-size="$3,$4" --virtual-time-budget=5000 \
    --screenshot="$2" "$1" >/dev/null 2>&1
  [ -s "$2" ] || { echo "chromium wrote no $2" >&2; exit 1; }
  echo "wrote $2"
}
mkdir -p "$(dirname "$prefix")"
shot "file://$run/index.html" "$(realpath -m "$prefix-index.png")" 1280 1500
shot "file://$page${location:+#$location}" "$(realpath -m "$prefix-compare.png")" 1100 1060
