#!/usr/bin/env bash
# On one worker: `sparsemem run ARGS...`, then its exit status into ~/sparsemem-run.status, which
# launch/resume.sh reads: 0 finished, 75 preempted (rerun resumes), anything else an error (see the log).
cd "$(dirname "$0")/.." || exit 1
rm -f ~/sparsemem-run.status
python3 -m sparsemem.cli run "$@"
echo $? > ~/sparsemem-run.status
