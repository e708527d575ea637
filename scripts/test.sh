#!/usr/bin/env bash
# The project's test command (README). Extra arguments go to pytest (`-n 0`: one process); the 25 slowest tests
# are listed at the end (CI budget). Two worker processes, each taking whole files (module fixtures run once):
# most of the suite's time is XLA compiling small programs, which uses one core.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pytest -q -n 2 --dist loadfile --durations=25 "$@"
