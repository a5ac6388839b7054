#!/usr/bin/env bash
# Runs every test. First makes sure what the tests need from outside is present, each step a
# no-op once done: Python's aiosmtpd (the real SMTP server the end-to-end tests deliver to), in
# a virtual environment under target/ so the system Python is left alone; Debian's chromium
# and chromium-driver for the preview page (installed with apt-get, as root); and a running
# local PostgreSQL server. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/test-python
if ! "$venv/bin/python" -c 'import aiosmtpd' 2>/dev/null; then
    echo "scripts/test.sh: installing aiosmtpd into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check 'aiosmtpd>=1.4,<2'
fi
export HERALD_TEST_PYTHON="$PWD/$venv/bin/python"

# The preview page is tested in a real headless browser: Debian's Chromium and its driver.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    echo "scripts/test.sh: installing chromium and chromium-driver" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi

# The PostgreSQL half of the suite runs against this server (each test makes and drops its
# own database). Set HERALD_TEST_POSTGRES to another admin URL, or to the empty string to
# skip those tests. The machine's own server is started if it is down.
export HERALD_TEST_POSTGRES="${HERALD_TEST_POSTGRES-postgres://postgres@127.0.0.1:5432/test}"
if [[ "$HERALD_TEST_POSTGRES" == postgres://postgres@127.0.0.1:5432/* ]] \
    && ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null && command -v pg_ctlcluster >/dev/null; then
    echo "scripts/test.sh: starting the local PostgreSQL server" >&2
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start
fi

# Postfix's smtp-sink and smtp-source, for the end-to-end bench's smoke run below (Debian's
# postfix package, installed with no mail system configured or started).
bench/setup.sh

cargo test "$@"

# The end-to-end bench, briefly, on the debug build: it must deliver every message; it asserts
# no timing. Skipped when arguments narrow the test run.
if [ $# -eq 0 ]; then
    # The binary `cargo test` just built, rather than a second build of it.
    smoke=(python3 bench/e2e.py --smoke --bin target/debug/herald)
    if [ -n "$HERALD_TEST_POSTGRES" ]; then
        HERALD_BENCH_POSTGRES="$HERALD_TEST_POSTGRES" "${smoke[@]}"
    else
        "${smoke[@]}" --backend sqlite
    fi
fi
