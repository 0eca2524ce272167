#!/usr/bin/env bash
# What the test suite needs beyond pip: a real redis-server and a real HAProxy (Debian's
# packages), which the tests start themselves on free loopback ports. Debian/Ubuntu; run as
# root or with sudo. Does nothing when both are already on the PATH.
set -euo pipefail
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" -ne 0 ]; then exec sudo "$0" "$@"; fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -q --no-install-recommends "${missing[@]}"
# The packages may start system services (redis on 6379, haproxy); the tests run their own.
for service in redis-server haproxy; do
  (systemctl disable --now "$service" 2>/dev/null || service "$service" stop 2>/dev/null \
    || pkill -x "$service") || true
done
