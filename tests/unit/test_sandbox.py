"""Pod sandbox records (node agent -> ztunnel) and the runner's system-workload backoff."""
import os

import pytest

from localcluster.system import RESTART_BACKOFF_MAX, restart_delay
from mesh.sandbox import Sandbox, SandboxDir, SandboxError


def test_write_get_remove(tmp_path):
    d = SandboxDir(str(tmp_path / "pods"))
    assert d.get("shop/web") is None
    sb = Sandbox(uid="shop/web", netns="/var/run/netns/x", cgroup="/sys/fs/cgroup/amb/pods/y")
    d.write(sb)
    assert d.get("shop/web") == sb
    assert d.get("shop/other") is None
    assert [f for f in os.listdir(tmp_path / "pods") if f.endswith(".tmp")] == []
    d.remove("shop/web")
    d.remove("shop/web")  # idempotent
    assert d.get("shop/web") is None


def test_relative_paths_refused(tmp_path):
    with pytest.raises(SandboxError, match="netns must be an absolute path"):
        SandboxDir(str(tmp_path)).write(Sandbox(uid="a/b", netns="x", cgroup="/c"))


def test_corrupt_or_foreign_record_named(tmp_path):
    d = SandboxDir(str(tmp_path))
    d.write(Sandbox(uid="a/b", netns="/n", cgroup="/c"))
    path = d._file("a/b")
    with open(path, "w") as f:
        f.write("{not json")
    with pytest.raises(SandboxError, match="bad sandbox record"):
        d.get("a/b")
    with open(path, "w") as f:
        f.write('{"uid": "x/y", "netns": "/n", "cgroup": "/c"}')
    with pytest.raises(SandboxError, match="is for x/y, not a/b"):
        d.get("a/b")


@pytest.mark.parametrize("restarts,delay", [(0, 1.0), (1, 2.0), (3, 8.0), (5, 30.0), (50, 30.0)])
def test_restart_backoff(restarts, delay):
    assert restart_delay(restarts) == min(delay, RESTART_BACKOFF_MAX)


def test_backoff_grows_with_exits_in_a_row_and_resets_after_a_long_run():
    from localcluster.system import BACKOFF_RESET, Proc
    p = Proc(argv=["x"], netns=None, cgroup=None, env={}, cwd=None, log_path="/dev/null")
    delays = []
    for start in (0.0, 10.0, 20.0, 30.0):   # quick exits: 1, 2, 4, 8 s
        p.started_at = start
        delays.append(p.backoff(start + 5))
    assert delays == [1.0, 2.0, 4.0, 8.0]
    p.started_at = 100.0                      # ran BACKOFF_RESET before exiting: shortest again
    assert p.backoff(100.0 + BACKOFF_RESET) == 1.0
    p.started_at = 800.0
    assert p.backoff(801.0) == 2.0
