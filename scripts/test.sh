#!/usr/bin/env bash
# The project's test command (README). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pytest -q "$@"
