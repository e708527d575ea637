#!/usr/bin/env bash
# Keep a run going through preemptions: every POLL seconds, if the slice is gone or PREEMPTED,
# recreate it, reinstall, restage and restart the same run (it resumes from its last checkpoint
# in $BUCKET/runs/<config name>); if the slice is up but the run exited 75 (stopped on SIGTERM,
# e.g. a maintenance event), restart the run. Stops when the run's report.md exists, or with the
# run's exit status when it failed with an error (that needs a fix, not a restart).
#   launch/resume.sh MODEL_DIR CONFIG [--set KEY=VALUE ...]
set -euo pipefail
here=$(dirname "$0")
source "$here/env.sh"
model=${1:?usage: launch/resume.sh MODEL_DIR CONFIG [--set ...]}
config=${2:?usage: launch/resume.sh MODEL_DIR CONFIG [--set ...]}
shift 2
report="$BUCKET/runs/$(basename "$config" .py)/report.md"
until gcloud storage ls "$report" > /dev/null 2>&1; do
  state=$(gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" --format 'value(state)' 2>/dev/null || echo GONE)
  if [[ $state == PREEMPTED || $state == GONE ]]; then
    echo "$(date -u +%FT%TZ) slice $TPU_NAME is $state: recreating"
    [[ $state == PREEMPTED ]] && "$here/delete.sh"
    "$here/create.sh" ${CREATE_FLAGS:-}
    "$here/install.sh"
    "$here/stage.sh" "$model" ${DATA_DIR:-}
    "$here/run.sh" "$config" "$@"
  else
    status=$(WORKER=0 on_workers "cat ~/sparsemem-run.status 2>/dev/null" 2>/dev/null || true)
    if [[ $status == 75 ]]; then
      echo "$(date -u +%FT%TZ) the run was preempted (exit 75) on a live slice: restarting it"
      "$here/run.sh" "$config" "$@"
    elif [[ -n $status && $status != 0 ]]; then
      echo "the run failed with exit status $status; see launch/logs.sh, fix it, then rerun this script"
      exit "$status"
    fi
  fi
  sleep "${POLL:-300}"
done
echo "done: $report"
