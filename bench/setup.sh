#!/bin/sh
# Installs what bench/e2e.py needs beyond the Rust toolchain: Postfix's smtp-sink and
# smtp-source (Debian package postfix). Postfix is installed with "No configuration", so no
# mail system is set up or started. Idempotent.
set -eu
if command -v smtp-sink >/dev/null && command -v smtp-source >/dev/null; then
    exit 0
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
$SUDO apt-get update -q >/dev/null || echo "warning: apt-get update failed; trying the install anyway" >&2
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q postfix >/dev/null
