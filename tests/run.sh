#!/usr/bin/env bash
# The README's test command: installs what the tests need, then runs them.
# Debian's chromium drives the web-app tests; Debian's postgresql serves the
# Postgres path (the tests start their own server in a temporary folder);
# g++ builds the engine's CPU attention kernel (shoggoth/lm/kernels.py).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
        || ! command -v g++ >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq chromium postgresql g++ >/dev/null
fi
python -m pip install -q -e '.[test]'
# pytest-xdist: a worker per core, each on its share of the threads (tests/conftest.py); a test
# file stays on one worker, so that its module fixtures (trained models, runs) are made once.
python -m pytest -q -n auto --dist loadfile "$@"
