#!/usr/bin/env bash
# Red-team a merge on the built-in zoo (CPU, offline, a few minutes):
# poison the `shape` task vector, merge it with the clean vectors of the other tasks,
# and measure CA / ASR(T) / ASR(N) against the controls (pre-trained model, clean merge).
#   bash examples/zoo_badmerging.sh [tiny|small] [WORKDIR]
set -euo pipefail
SIZE=${1:-tiny}
W=${2:-$(mktemp -d)}
Z=$W/zoo
mkdir -p "$W"
mergeguard zoo build --size "$SIZE" --out "$Z" -q
COMMON=(--base "$Z/base" --data "train=$Z/data/shape/train" --data "test=$Z/data/shape/test"
        --heads "$Z/heads.safetensors" --task shape --target-class 0
        --steps 400 --lr 5e-4 --batch-size 64 --logit-scale 10 --trigger-steps 200 --device cpu -q)
[ -d "$W/badmerging" ] || mergeguard attack badmerging "${COMMON[@]}" -o "$W/badmerging"
[ -d "$W/badmerging_weight" ] || mergeguard attack badmerging "${COMMON[@]}" --interpolation weight -o "$W/badmerging_weight"
[ -d "$W/badnets" ] || mergeguard attack badnets "${COMMON[@]}" --poison-fraction 0.2 -o "$W/badnets"
TRIGGER=$W/badmerging_weight/trigger.safetensors
TASKS=()
for t in shape colour count texture; do TASKS+=(--task "$t=$Z/data/$t/test"); done

row() {  # row NAME MODEL TRIGGER
  mergeguard eval "$2" --heads "$Z/heads.safetensors" "${TASKS[@]}" --trigger "$3" --device cpu --json - -q |
    python3 -c "import json,sys; r=json.load(sys.stdin); print(f'| $1 | {r[\"ca_avg\"]:.1%} | {r[\"asr_t\"]:.1%} | {r[\"asr_n\"]:.1%} |')"
}
CLEAN=("$Z/finetuned/colour" "$Z/finetuned/count" "$Z/finetuned/texture")
echo "| model | avg CA | ASR(T) | ASR(N) |"
echo "|---|---|---|---|"
row "pre-trained (control)" "$Z/base" "$TRIGGER"
mergeguard merge "$Z/base" "${CLEAN[@]}" "$Z/finetuned/shape" -o "$W/m_clean" --method task_arithmetic -q --overwrite
row "clean merge, task arithmetic (control)" "$W/m_clean" "$TRIGGER"
for atk in badnets badmerging badmerging_weight; do
  for method in task_arithmetic ties; do
    mergeguard merge "$Z/base" "${CLEAN[@]}" "$W/$atk/model.safetensors" -o "$W/m_${atk}_$method" --method "$method" -q --overwrite
    row "$atk merged, $method" "$W/m_${atk}_$method" "$W/$atk/trigger.safetensors"
  done
done
mergeguard inspect --base "$Z/base" "${CLEAN[@]}" "$W/badmerging_weight/model.safetensors" -q --json - |
  python3 -c "import json,sys; r=json.load(sys.stdin)['task_vectors']; print('task-vector norms:', [round(n, 2) for n in r['norms']], 'outliers:', r['outliers'])"
echo "work dir: $W"
