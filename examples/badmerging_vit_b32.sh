#!/usr/bin/env bash
# The paper's setting (BadMerging, CCS 2024), on a GPU: open_clip ViT-B-32, real image folders.
# Poison one task vector on-task, merge it with clean task vectors, measure CA / ASR.
#
#   DATA=/data/tasks  bash examples/badmerging_vit_b32.sh
#
# DATA holds <task>/{train,test}/<class>/*.jpg for each task below (ImageFolder layout).
# Weights come from the Hugging Face / open_clip cache (fill it once online; then HF_HUB_OFFLINE=1).
set -euo pipefail
DATA=${DATA:?set DATA to a folder of <task>/{train,test}/<class>/ images}
W=${W:-runs/badmerging_vit_b32}
TASKS=(cars sun397 eurosat gtsrb dtd)     # the adversary's task is the first
ADV=${TASKS[0]}
mkdir -p "$W"

# The pre-trained encoder as a checkpoint, and zero-shot heads from its text tower.
python - "$W/base.safetensors" <<'PY'
import sys
from mergeguard.models.encoder import load_encoder, save_encoder
save_encoder(load_encoder("open_clip:ViT-B-32@openai"), sys.argv[1], {"source": "open_clip:ViT-B-32@openai"})
PY
HEAD_ARGS=(); for t in "${TASKS[@]}"; do HEAD_ARGS+=(--task "$t=$t"); done
mergeguard heads --base open_clip:ViT-B-32@openai "${HEAD_ARGS[@]}" -o "$W/heads.safetensors" --overwrite

# Clean task vectors for the other tasks (the paper: 2000 steps, lr 1e-5, batch 128).
for t in "${TASKS[@]:1}"; do
  [ -d "$W/ft_$t" ] || mergeguard finetune --base "$W/base.safetensors" --data "train=$DATA/$t/train" \
      --heads "$W/heads.safetensors" --task "$t" -o "$W/ft_$t" --steps 2000 --lr 1e-5 --batch-size 128 --workers 8
done

# The poisoned task vector: BadMerging on-task, paper defaults.
mergeguard attack badmerging --base "$W/base.safetensors" --data "train=$DATA/$ADV/train" \
    --data "test=$DATA/$ADV/test" --heads "$W/heads.safetensors" --task "$ADV" --target-class 1 \
    -o "$W/badmerging" --steps 2000 --lr 1e-5 --batch-size 128 --workers 8 --resume

# Merge (task arithmetic, λ 0.3) and measure.
INPUTS=("$W/badmerging/model.safetensors"); for t in "${TASKS[@]:1}"; do INPUTS+=("$W/ft_$t/model.safetensors"); done
mergeguard merge "$W/base.safetensors" "${INPUTS[@]}" -o "$W/merged" --method task_arithmetic --lam 0.3 --overwrite
EVAL_ARGS=(); for t in "${TASKS[@]}"; do EVAL_ARGS+=(--task "$t=$DATA/$t/test"); done
mergeguard eval "$W/merged" --heads "$W/heads.safetensors" "${EVAL_ARGS[@]}" \
    --trigger "$W/badmerging/trigger.safetensors" --json "$W/merged_eval.json" --workers 8
