#!/usr/bin/env python3
"""N concurrent long-lived connections through a ztunnel pair (CI runs the default 10,000).

Runs tests/netns/test_load.py with AMBIENT_LOAD_N (default 10000): byte-exact echo on every
connection, RSS and fds of both ztunnels from /proc (before, with all streams idle, after
close), the 200 MB cap per ztunnel at 10,000 idle HBONE streams, fds back to the baseline.

    sudo flock /tmp/netns.lock .venv/bin/python tests/bench/load.py [N]
"""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    n = sys.argv[1] if len(sys.argv) > 1 else "10000"
    env = dict(os.environ, AMBIENT_LOAD_N=n)
    sys.exit(subprocess.call([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                              "tests/netns/test_load.py"], cwd=ROOT, env=env))
