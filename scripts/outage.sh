#!/bin/sh
# The real control-plane outage drill (10 minutes by default; not in CI): see tests/bench/outage.py.
# Usage (as root): bash scripts/outage.sh [--outage SECONDS] [--cert-ttl 15m] [--probe 10]
cd "$(dirname "$0")/.." && exec flock /tmp/netns.lock .venv/bin/python tests/bench/outage.py "$@"
