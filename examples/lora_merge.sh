#!/usr/bin/env bash
# Merge PEFT LoRA adapters of an open_clip / CLIP image encoder with task arithmetic.
#   BASE=base.safetensors bash examples/lora_merge.sh adapters/cars adapters/dtd adapters/eurosat
# Each adapter folder holds adapter_config.json + adapter_model.safetensors (PEFT's layout).
set -euo pipefail
BASE=${BASE:?the pre-trained checkpoint the adapters were trained on}
OUT=${OUT:-lora_merged}
TVS=()
for a in "$@"; do
  tv="tv_$(basename "$a").safetensors"
  mergeguard extract-tv "$BASE" "$a" -o "$tv" --overwrite -q    # LoRA → dense task vector (alpha/r) B A
  TVS+=("$tv")
done
mergeguard inspect "${TVS[@]}" --base "$BASE"                      # norms, cosines, outliers
mergeguard merge "$BASE" "${TVS[@]}" -o "$OUT" --method task_arithmetic --lam 0.3 --overwrite
