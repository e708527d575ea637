#!/usr/bin/env bash
# Follow the run's log on worker 0 (WORKER=n for another worker; Ctrl-C stops following, not the run).
set -euo pipefail
source "$(dirname "$0")/env.sh"
WORKER=${WORKER:-0} on_workers "tail -n 50 -F ~/sparsemem-run.log"
