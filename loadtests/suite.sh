#!/usr/bin/env bash
# Every figure in docs/benchmarks.md: relay against both baselines, same parameters, one run.
# Usage: loadtests/suite.sh [RESULTS_DIR]   (needs scripts/install-bench-deps.sh for nchan)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-loadtests/results}
mkdir -p "$out"
run() { name=$1; shift; echo "### $name: python -m loadtests $*"; python3 -m loadtests "$@" --compare --no-progress --out "$out/$name.json"; echo; }
run fanout-1k     fanout --connections 1000  --envs 10 --rate 100 --duration 20
run fanout-10k    fanout --connections 10000 --envs 10 --rate 100 --duration 20
run fanout-75k    fanout --connections 5000  --envs 10 --rate 150 --duration 20
run burst-10k     burst  --connections 10000 --envs 10 --duration 10
run storm-10k     connect-storm --connections 10000 --envs 10
run idle-10k      idle   --connections 10000 --envs 10
run idle-19k      idle   --connections 19000 --envs 10
