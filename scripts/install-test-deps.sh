#!/usr/bin/env bash
# What the test suite needs beyond pip: a real redis-server and a real HAProxy (Debian's
# packages), which the tests start themselves on free loopback ports, and kubectl (1.27 or
# newer: it bundles kustomize 5) to render k8s/. Debian/Ubuntu; run as root or with sudo.
# Does nothing when all are already on the PATH.
set -euo pipefail
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
if ! command -v kubectl >/dev/null 2>&1; then
  # Debian's own kubectl (kubernetes-client) is 1.20, too old for kustomize 5: kubectl comes
  # from the Kubernetes apt repository (pkgs.k8s.io) where one is configured.
  if apt-cache policy kubectl 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    missing+=(kubectl)
  else
    echo "install-test-deps: kubectl is missing and no apt source offers it;" \
         "install kubectl 1.27+ (https://kubernetes.io/docs/tasks/tools/)" >&2
  fi
fi
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
