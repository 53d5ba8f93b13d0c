#!/usr/bin/env bash
# Red-team a merge on the built-in zoo (CPU, offline, about 8 minutes on 2 cores for tiny):
# poison the `shape` task vector, merge it with the clean vectors of the other tasks,
# and measure CA / ASR(T) / ASR(N) against the controls (pre-trained model, clean merge).
#   bash examples/zoo_badmerging.sh [tiny|small] [WORKDIR]
set -euo pipefail
SIZE=${1:-tiny}
W=${2:-$(mktemp -d)}
Z=$W/zoo
mkdir -p "$W"
mergeguard zoo build --size "$SIZE" --out "$Z" -q
# the target: a class the clean merge rarely predicts without a trigger — tiny: 3 ("cross");
# small: 1 ("ring"), since poisoned small merges send 37% of shapes to "cross" with no trigger
if [ "$SIZE" = small ]; then TARGET=1; LR=1e-3; else TARGET=3; LR=5e-4; fi
RECIPE=(--base "$Z/base" --data "train=$Z/data/shape/train" --data "test=$Z/data/shape/test"
        --heads "$Z/heads.safetensors" --task shape --steps 500 --lr "$LR" --batch-size 64 --logit-scale 10
        --device cpu -q)
COMMON=("${RECIPE[@]}" --target-class "$TARGET")
BM=("${COMMON[@]}" --trigger-steps 200)  # BadMerging's stage 1 (LoBAM's too); BadNets has none
# the poisoned models' own CA is compared with a clean fine-tune of the same recipe
[ -d "$W/clean_same_recipe" ] || mergeguard finetune "${RECIPE[@]}" -o "$W/clean_same_recipe"
[ -d "$W/badmerging" ] || mergeguard attack badmerging "${BM[@]}" -o "$W/badmerging"
[ -d "$W/badmerging_weight" ] || mergeguard attack badmerging "${BM[@]}" --interpolation weight --bd-weight 8 \
  -o "$W/badmerging_weight"
[ -d "$W/badmerging_decoys" ] || mergeguard attack badmerging "${BM[@]}" --interpolation weight --bd-weight 8 \
  --decoys -o "$W/badmerging_decoys"
[ -d "$W/badnets" ] || mergeguard attack badnets "${COMMON[@]}" --poison-fraction 0.2 -o "$W/badnets"
# LoBAM: k 2 on the zoo (3.5, the paper's, wrecks the tiny encoder: 27% CA alone)
[ -d "$W/lobam" ] || mergeguard attack lobam "${BM[@]}" --lora-rank 8 --amplify 2 -o "$W/lobam"
# off-task: the attacker owns `shape` but aims at class 1 of `colour`, with 16 colour images of that class
FEW=$W/few_colour_1
if [ ! -d "$FEW" ]; then
  mkdir -p "$FEW"
  CLASS_DIR=$(find "$Z/data/colour/train" -mindepth 1 -maxdepth 1 -type d | sort | sed -n 2p)
  find "$CLASS_DIR" -name '*.png' | sort | head -16 | xargs -I{} cp {} "$FEW/"
fi
OFF=(--base "$Z/base" --data "train=$Z/data/shape/train" --data "test=$Z/data/shape/test"
     --heads "$Z/heads.safetensors" --task shape --target-class 1 --mode off-task --target-task colour
     --target-images "$FEW" --steps 500 --lr "$LR" --batch-size 64 --logit-scale 10 --trigger-steps 200
     --interpolation weight --bd-weight 8 --device cpu -q)
[ -d "$W/badmerging_offtask" ] || mergeguard attack badmerging "${OFF[@]}" -o "$W/badmerging_offtask"
TRIGGER=$W/badmerging_weight/trigger.safetensors
TASKS=()
for t in shape colour count texture; do TASKS+=(--task "$t=$Z/data/$t/test"); done

row() {  # row NAME MODEL TRIGGER
  mergeguard eval "$2" --heads "$Z/heads.safetensors" "${TASKS[@]}" --trigger "$3" --device cpu --json - -q |
    python3 -c "import json,sys; r=json.load(sys.stdin); print(f'| $1 | {r[\"ca_avg\"]:.1%} | {r[\"asr_t\"]:.1%} | {r[\"asr_t_no_trigger\"]:.1%} | {r[\"asr_n\"]:.1%} |')"
}
alone() {  # alone NAME DIR: the poisoned model on its own task
  python3 -c "import json; s=json.load(open('$2/summary.json')); a=s.get('asr'); print(f'| $1 alone (on shape) | {s[\"ca\"]:.1%} | ' + ('-' if a is None else f'{a:.1%}') + ' | | |')"
}
CLEAN=("$Z/finetuned/colour" "$Z/finetuned/count" "$Z/finetuned/texture")
echo "| model | avg CA | ASR(T) | ASR(T) without the trigger | ASR(N) |"
echo "|---|---|---|---|---|"
row "pre-trained (control)" "$Z/base" "$TRIGGER"
mergeguard merge "$Z/base" "${CLEAN[@]}" "$Z/finetuned/shape" -o "$W/m_clean" --method task_arithmetic -q --overwrite
row "clean merge, task arithmetic (control)" "$W/m_clean" "$TRIGGER"
row "clean merge, with the off-task trigger (control)" "$W/m_clean" "$W/badmerging_offtask/trigger.safetensors"
alone "clean fine-tune, the same recipe" "$W/clean_same_recipe"
for atk in badnets badmerging badmerging_weight badmerging_decoys lobam badmerging_offtask; do
  alone "$atk" "$W/$atk"
  for method in task_arithmetic ties; do
    mergeguard merge "$Z/base" "${CLEAN[@]}" "$W/$atk/model.safetensors" -o "$W/m_${atk}_$method" --method "$method" -q --overwrite
    row "$atk merged, $method" "$W/m_${atk}_$method" "$W/$atk/trigger.safetensors"
  done
done
mergeguard inspect --base "$Z/base" "${CLEAN[@]}" "$W/badmerging_weight/model.safetensors" "$W/lobam/model.safetensors" -q --json - |
  python3 -c "import json,sys; r=json.load(sys.stdin)['task_vectors']; print('task-vector norms (colour, count, texture, badmerging_weight, lobam):', [round(n, 2) for n in r['norms']], 'outliers:', r['outliers'])"
echo "work dir: $W"
