#!/usr/bin/env bash
# What the test suite needs beyond pip: a real redis-server (Debian's package), which the tests
# start themselves on free loopback ports. Debian/Ubuntu; run as root or with sudo.
# Does nothing when redis-server is already on the PATH.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" -ne 0 ]; then exec sudo "$0" "$@"; fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -q --no-install-recommends redis-server
# The package may start a system redis on 6379; the tests run their own.
(systemctl disable --now redis-server 2>/dev/null || service redis-server stop 2>/dev/null || pkill -x redis-server) || true
