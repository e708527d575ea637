#!/usr/bin/env bash
# The project's test command (README). Extra arguments go to pytest; the 25 slowest tests are listed at the end (CI budget).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pytest -q --durations=25 "$@"
