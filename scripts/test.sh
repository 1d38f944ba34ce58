#!/usr/bin/env bash
# Install what the tests need (Xvfb through apt where missing) and run the whole suite, one worker per core.
# Extra arguments go to pytest (`-n 0` runs the tests in this process).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_common.sh
# shellcheck disable=SC2086
ensure_debs $RUNTIME_DEBS $TEST_DEBS
ensure_venv
pip_install qt,testing
# one pytest worker (pytest-xdist) per CPU this process may use, at most 4, unless the arguments choose: the suite
# keeps about one core busy at a time, so two workers on two cores took 7 min 45 s where one took 12 min 36 s. Each
# test file runs in one worker (--dist loadfile), so a module's fixtures are made once: 5 min 56 s and 5 min 59 s
# against 6 min 19 s dealing single tests to the workers (the same clone, one run after another)
n=$(nproc 2>/dev/null || echo 1)
workers=(-n "$(( n < 2 ? 0 : n < 4 ? n : 4 ))" --dist loadfile)
for a in "$@"; do
  case "$a" in -n | -n* | --numprocesses* | *no:xdist) workers=() ;; esac
done
exec .venv/bin/python -m pytest "${workers[@]}" "$@"
