#!/usr/bin/env bash
# Merge fine-tuned checkpoints straight from the Hugging Face Hub (pinned revisions), then
# defend the merge. Fill the cache once online; afterwards HF_HUB_OFFLINE=1 works.
#   bash examples/hub_merge.sh
set -euo pipefail
BASE=${BASE:-openai/clip-vit-base-patch32@main}
INPUTS=(${INPUTS:-org/clip-vit-b32-cars@main org/clip-vit-b32-dtd@main org/clip-vit-b32-eurosat@main})
mergeguard inspect "${INPUTS[@]}" --base "$BASE"
mergeguard merge "$BASE" "${INPUTS[@]}" -o hub_merged --method ties --lam 0.3 --density 0.2 --overwrite
# no labels, no trigger: any folder of unlabeled images works as the shadow set
[ -n "${SHADOW:-}" ] && mergeguard defend lfpm --merged hub_merged --base "$BASE" --shadow "$SHADOW" -o hub_defended
