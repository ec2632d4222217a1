#!/usr/bin/env bash
# Install the Debian packages named on the command line that are not installed yet.
#
#   tests/support/install-system-packages.sh PKG...
#
# Idempotent and quiet when everything is present: it runs `apt-get update` (once) only
# when something is missing, so CI and the test fixtures can call it every time.
# Package scripts must not start daemons on a machine without systemd (they would
# fail, or run with the distribution's config behind the tests' back), so a
# policy-rc.d that refuses (exit 101) is in place during the install, unless the
# machine already has one, which is left alone.
set -euo pipefail

if [ "$#" -eq 0 ]; then
    echo "usage: $0 PKG..." >&2
    exit 2
fi

missing=()
for pkg in "$@"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    if [ "$status" != "install ok installed" ]; then
        missing+=("$pkg")
    fi
done
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "missing Debian packages: ${missing[*]} (run this script as root to install them)" >&2
    exit 1
fi

policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
fi

export DEBIAN_FRONTEND=noninteractive
# Wait for another apt/dpkg run (CI may install redis and chromium at the same time).
apt_opts=(-q -o DPkg::Lock::Timeout=300)
echo "installing: ${missing[*]}" >&2
apt-get "${apt_opts[@]}" update >/dev/null
apt-get "${apt_opts[@]}" install -y --no-install-recommends "${missing[@]}" >/dev/null
