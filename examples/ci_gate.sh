#!/usr/bin/env bash
# Gate a release on a merged model: fail the pipeline when a known trigger works or accuracy drops.
#   MODEL=merged/ HEADS=heads.safetensors TEST=data/cars/test TRIGGER=trigger.safetensors bash examples/ci_gate.sh
# Exit codes: 0 pass, 1 a threshold was crossed (block the release), 2 bad input.
set -uo pipefail
MODEL=${MODEL:?the merged model (file, folder or Hub id)}
HEADS=${HEADS:?heads file (mergeguard heads)}
TEST=${TEST:?an ImageFolder test set: <class>/*.jpg}
TRIGGER=${TRIGGER:?a trigger file (from attack, or your red team)}
TASK=${TASK:-cars}
mergeguard eval "$MODEL" --heads "$HEADS" --task "$TASK=$TEST" --trigger "$TRIGGER" \
    --max-asr "${MAX_ASR:-0.05}" --min-ca "${MIN_CA:-0.6}" --json eval.json -q
status=$?
case $status in
  0) echo "release gate: pass" ;;
  1) echo "release gate: BLOCKED (ASR above ${MAX_ASR:-0.05} or CA below ${MIN_CA:-0.6}; see eval.json)" ;;
  *) echo "release gate: error (bad input)" ;;
esac
exit $status
