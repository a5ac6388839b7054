#!/usr/bin/env bash
# Runs herald on its embedded default (config/herald.yaml: SQLite in var/, each message written
# as an .eml file into var/mail/) with the shipped sample directory and one payload per kind.
# Extra arguments go to `herald run` (e.g. --drain to exit once everything is sent).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${HERALD_BIN:-}" ]]; then
    cargo build --release --quiet
    HERALD_BIN=target/release/herald
fi

"$HERALD_BIN" check
"$HERALD_BIN" directory import examples/directory.yaml
for payload in examples/payloads/*.json; do
    "$HERALD_BIN" enqueue "$(basename "$payload" .json)" "$payload"
done
echo "herald is running; messages appear in var/mail/. Stop it with Ctrl-C."
exec "$HERALD_BIN" run "$@"
