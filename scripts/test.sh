#!/usr/bin/env bash
# Install pkd into .venv, lint and type-check (scripts/lint.sh), then run the test suite.
#   bash scripts/test.sh           the default tier: every test not marked ``slow`` (the engineer's loop)
#   bash scripts/test.sh --slow    slow tests included (what CI runs: .ci/run); not the crash-point enumerations
#   bash scripts/test.sh --crash   everything, the crash-point enumerations (tests/test_crash_points.py) included
# Tests run on every core (pytest-xdist, -n auto; one intra-op thread each, tests/conftest.py). Further arguments
# go to pytest (-n 0: one process). A lint or type finding, or collecting no tests, is a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
bash scripts/lint.sh || { echo "error: lint or type check failed (scripts/lint.sh)" >&2; exit 1; }
export HF_HUB_OFFLINE=1
tier=(-m "not slow and not crash")
case "${1:-}" in
    --slow) tier=(-m "not crash"); shift ;;
    --crash) tier=(); shift ;;
esac
.venv/bin/python -m pytest -n auto --durations=15 "${tier[@]}" "$@"  # the slowest tests, to keep the CI run well under 30 minutes
status=$?
if [ "$status" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit "$status"
