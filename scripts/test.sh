#!/usr/bin/env bash
# The whole test suite: unit, protocol and root (netns, cgroup, eBPF) tiers. Installs first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m pytest -p no:cacheprovider "${@:-tests}"
