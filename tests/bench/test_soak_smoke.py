"""Smoke test (root): soak.py for 24 s (a restart, a short control-plane outage) writes its plot, table and JSON, flags nothing, leaves nothing behind."""
import json
import os
import shutil
import subprocess
import sys
import zlib

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CLUSTER = f"ss{os.getpid() % 100000}"


@pytest.mark.root
def test_short_soak_writes_plot_and_table_and_flags_nothing(tmp_path):
    try:
        p = subprocess.run([sys.executable, os.path.join(HERE, "soak.py"), "--minutes", "0.4", "--sample", "1",
                            "--restart-every", "5", "--outage", "4", "--cluster", CLUSTER, "--out", str(tmp_path)],
                           capture_output=True, text=True, timeout=150)
    finally:  # the throwaway cluster's CA (ambient down keeps CAs, as it should for users)
        shutil.rmtree(f"/var/lib/ambient/{CLUSTER}", ignore_errors=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    files = sorted(os.listdir(tmp_path))
    assert [f.rsplit(".", 1)[1] for f in files] == ["json", "md", "png"], files
    png = (tmp_path / files[2]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    idat = png.index(b"IDAT")
    raw = zlib.decompress(png[idat + 4:idat + 4 + int.from_bytes(png[idat - 4:idat], "big")])
    assert len(raw) == height * (1 + 3 * width) and len(set(raw)) > 8   # lines drawn, not a blank image
    res = json.loads((tmp_path / files[0]).read_text())
    # On a loaded machine a restart can take seconds, so the last scheduled one may not fit in 20 s.
    assert [e["what"] for e in res["events"]][:3] == ["restart", "outage-start", "outage-end"], res["events"]
    assert all(e["ok"] for e in res["events"])
    assert sum(res["traffic"]["ok"].values()) > 50 and sum(res["traffic"]["failed"].values()) == 0, res["traffic"]
    assert all(res["traffic"]["ok"][k] > 0 for k in ("short", "stream", "bulk")), res["traffic"]
    procs = {t["proc"] for t in res["table"]}
    assert {"ztunnel n1", "ztunnel n2", "runner"} <= procs
    assert all(t["flag"] == "flat" for t in res["table"]), res["table"]
    pids = {r["ztunnel n2"]["pid"] for r in res["samples"] if "ztunnel n2" in r}
    assert len(pids) >= 2   # the restarts were sampled: more than one process per node
    assert "| ztunnel n1 | rss_mb |" in p.stdout and "soak ok" in p.stdout
    assert not os.path.exists(f"/run/ambient/{CLUSTER}")
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"amb-{CLUSTER}-" not in netns
