#!/usr/bin/env bash
# Profile edgeproxy (workers: 1) under py-spy during 16-connection wrk runs, JSON then SSE:
# writes benchmarks/results/profile-{json,sse}.txt (top functions by own time) and .svg
# flamegraphs. Installs py-spy into .venv if missing. Options: see pyspy_profile.py --help.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python benchmarks/pyspy_profile.py "$@"
