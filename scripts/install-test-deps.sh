#!/usr/bin/env bash
# What the test suite needs beyond pip: a real redis-server and a real HAProxy (Debian's
# packages), which the tests start themselves on free loopback ports, kubectl (1.27 or
# newer: it bundles kustomize 5) to render k8s/, Debian's chromium for the browser tests of
# clients/js (Playwright drives it by its path), and clients/js's npm packages (`npm ci`,
# with Node 20+ and npm already on the machine). Debian/Ubuntu; run as root or with sudo.
# Installs only what is missing.
set -euo pipefail
missing=()
status=0  # 1 when something the tests need could not be installed (said above why)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
here="$(cd "$(dirname "$0")/.." && pwd)"
if [ ! -f "$here/clients/js/node_modules/.package-lock.json" ]; then
  if command -v npm >/dev/null 2>&1; then
    (cd "$here/clients/js" && npm ci --no-audit --no-fund --loglevel=error)
  else
    echo "install-test-deps: npm is missing: install Node.js 20+ (with npm) for clients/js" >&2
    status=1
  fi
fi
if ! command -v kubectl >/dev/null 2>&1; then
  # Debian's own kubectl (kubernetes-client) is 1.20, too old for kustomize 5: kubectl comes
  # from the Kubernetes apt repository (pkgs.k8s.io) where one is configured.
  if apt-cache policy kubectl 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    missing+=(kubectl)
  else
    echo "install-test-deps: kubectl is missing and no apt source offers it: install" \
         "kubectl 1.27+ yourself (https://kubernetes.io/docs/tasks/tools/), or add the" \
         "Kubernetes apt repository (pkgs.k8s.io) and run this again; tests/system/test_k8s.py" \
         "needs it to render k8s/" >&2
    status=1
  fi
fi
if [ ${#missing[@]} -eq 0 ]; then exit "$status"; fi
if [ "$(id -u)" -ne 0 ]; then exec sudo "$0" "$@"; fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -q --no-install-recommends "${missing[@]}"
# The packages may start system services (redis on 6379, haproxy); the tests run their own.
for service in redis-server haproxy; do
  (systemctl disable --now "$service" 2>/dev/null || service "$service" stop 2>/dev/null \
    || pkill -x "$service") || true
done
exit "$status"
