"""Worker slots of the capture maps: how many workers a node may run, refused with a reason past that."""
import argparse

import pytest

from ebpf.capture import Capture, CaptureError
from ebpf.maps import ListenerKey, OutboundKey, max_workers
from localcluster.cli import _workers


def test_max_workers_comes_from_types_h_and_the_keys_carry_the_worker():
    assert max_workers() == 16
    assert [f for f, _ in ListenerKey._fields_] == ["pod_ip", "kind", "worker"]
    assert [f for f, _ in OutboundKey._fields_][:2] == ["netns_cookie", "worker"]


@pytest.mark.parametrize("worker", [-1, 16, 100])
def test_a_worker_index_without_a_slot_is_refused(worker):
    with pytest.raises(CaptureError) as e:
        Capture("/sys/fs/bpf/ambient-x", ztunnel_cgroup="/sys/fs/cgroup/x", worker=worker)
    assert e.value.reason == "bad_config" and "MAX_WORKERS" in str(e.value)


def test_ambient_up_accepts_1_to_16_workers():
    assert _workers("1") == 1 and _workers("16") == 16
    for bad in ("0", "17", "two"):
        with pytest.raises(argparse.ArgumentTypeError, match="1..16"):
            _workers(bad)
