#!/bin/sh
# The soak (30 minutes by default; not in CI): see tests/bench/soak.py.
# Usage (as root): bash scripts/soak.sh [--minutes 30] [--restart-every 120] [--outage 120] [--out DIR]
cd "$(dirname "$0")/.." && exec flock /tmp/netns.lock .venv/bin/python tests/bench/soak.py "$@"
