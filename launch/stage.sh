#!/usr/bin/env bash
# Stage a model (and optionally a TFDS data dir) on GCS once, then onto every worker's local disk.
#   launch/stage.sh MODEL_DIR [DATA_DIR]
# MODEL_DIR: a local Hugging Face folder (config.json, tokenizer.json, *.safetensors) or a gs:// copy of one;
# it lands in ~/$REMOTE_DIR/models/<name> on the workers, where the paper configs' model.path points.
# DATA_DIR: a prepared TFDS data dir (array_record); it lands in ~/tensorflow_datasets (the TFDS default).
set -euo pipefail
source "$(dirname "$0")/env.sh"
model=${1:?usage: launch/stage.sh MODEL_DIR [DATA_DIR]}
name=$(basename "${model%/}")
if [[ $model != gs://* ]]; then
  gcloud storage rsync --recursive "$model" "$BUCKET/models/$name"
fi
on_workers "mkdir -p ~/$REMOTE_DIR/models/$name && gcloud storage rsync --recursive $BUCKET/models/$name ~/$REMOTE_DIR/models/$name"
if [[ $# -ge 2 ]]; then
  data=$2
  if [[ $data != gs://* ]]; then
    gcloud storage rsync --recursive "$data" "$BUCKET/tensorflow_datasets"
    data=$BUCKET/tensorflow_datasets
  fi
  on_workers "mkdir -p ~/tensorflow_datasets && gcloud storage rsync --recursive $data ~/tensorflow_datasets"
fi
