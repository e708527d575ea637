#!/usr/bin/env bash
# The project's test command (README). Extra arguments go to pytest (`-n 0`: one process); the 25 slowest tests
# are listed at the end (CI budget). Two worker processes, each taking whole files (module fixtures run once):
# most of the suite's time is XLA compiling small programs, which uses one core.
#
# A worker that dies (a segfault inside XLA's CPU compiler, seen once in CI near the end of the suite) is not
# replaced: pytest-xdist's whole-file scheduler can hang forever after replacing one (pytest-xdist #784, #1323),
# so the run stops and names the test it died on. Only then is the suite run once more, in full; an ordinary
# test failure is never retried.
set -uo pipefail
cd "$(dirname "$0")/.."
log="$(mktemp -t sparsemem-tests-XXXXXX.log)"
trap 'rm -f "$log"' EXIT

run_suite() {
  python3 -m pytest -q -n 2 --dist loadfile --max-worker-restart=0 --durations=25 "$@" 2>&1 | tee "$log"
  return "${PIPESTATUS[0]}"
}

run_suite "$@"
status=$?
if [ "$status" -ne 0 ] && grep -q "crashed while running" "$log"; then
  echo "A test worker crashed (the test it died on is named above); running the whole suite once more." >&2
  run_suite "$@"
  status=$?
fi
exit "$status"
