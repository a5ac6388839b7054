#!/usr/bin/env bash
# Runs every test. First makes sure the tests' one outside dependency is present: Python's
# aiosmtpd, the real SMTP server the end-to-end tests deliver to. It is installed into a
# virtual environment under target/ (so the system Python is left alone); re-running is a
# no-op once it is there. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/test-python
if ! "$venv/bin/python" -c 'import aiosmtpd' 2>/dev/null; then
    echo "scripts/test.sh: installing aiosmtpd into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check 'aiosmtpd>=1.4,<2'
fi
export HERALD_TEST_PYTHON="$PWD/$venv/bin/python"

cargo test "$@"
