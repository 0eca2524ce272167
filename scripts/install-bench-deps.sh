#!/usr/bin/env bash
# What the benchmarks need beyond pip: nginx with the nchan module (the nchan baseline).
# Debian/Ubuntu; run as root (or with sudo). The test suite does not need this.
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then exec sudo "$0" "$@"; fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -q --no-install-recommends nginx-light libnginx-mod-nchan
# The package starts a system nginx on port 80; the harness runs its own on a free port.
(systemctl disable --now nginx 2>/dev/null || service nginx stop 2>/dev/null || pkill -x nginx) || true
