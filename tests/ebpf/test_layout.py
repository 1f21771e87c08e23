"""The Python side of the capture maps agrees with the compiled C (design rule 14).

Python declares no struct: ebpf.maps takes key/value types from bcc's metadata of the compiled
programs and enum values from types.h.  These tests compile C static assertions generated from
the Python view, so the compiler itself checks sizes, offsets and enum values.
"""
from __future__ import annotations

import ctypes
import os

import pytest

from ebpf import loader, maps
from ebpf.capture import teardown_pins

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def progs():
    pin = f"/sys/fs/bpf/amb-layout{os.getpid()}"
    os.makedirs(f"{pin}/maps", exist_ok=True)
    p = loader.Programs(loader.cflags_for(maps_pin_dir=f"{pin}/maps", ports=(15001, 15006, 15008),
                                          mark=0x539, fail_open=False))
    try:
        p.load_all()
        yield p
    finally:
        p.close()
        teardown_pins(pin)
    assert not os.path.exists(pin)


def _struct_asserts(c_name: str, ctype: type) -> list[str]:
    out = [f"_Static_assert(sizeof({c_name}) == {ctypes.sizeof(ctype)}, \"size of {c_name}\");"]
    for fname, *_ in getattr(ctype, "_fields_", []):
        off = getattr(ctype, fname).offset
        out.append(f"_Static_assert(__builtin_offsetof({c_name}, {fname}) == {off}, "
                   f"\"offset of {c_name}.{fname}\");")
    return out


def test_python_types_match_compiled_layouts(progs):
    cm = maps.CaptureMaps(progs)
    checks = {
        "struct listener_key": cm.ListenerKey, "struct pod_info": cm.PodInfo,
        "struct conn_key": cm.ConnKey, "struct orig_dst": cm.OrigDst,
        "__u64": cm.OutboundKey, "__u32": cm.PodKey,
    }
    lines = [line for c_name, t in checks.items() for line in _struct_asserts(c_name, t)]
    for enum in ("listener_kind", "capture_counter"):
        for name, value in maps.header_enum(enum).items():
            lines.append(f"_Static_assert({name} == {value}, \"{name}\");")
    from bcc import BPF
    text = "#include <uapi/linux/bpf.h>\n#include \"include/types.h\"\n" + "\n".join(lines)
    # raises ("Failed to compile") if any assertion fails
    BPF(text=text.encode(), cflags=[f"-I{loader.BPF_DIR}"]).cleanup()
    assert len(lines) > 20


def test_counters_and_kinds_from_types_h(progs):
    names = maps.counter_names()
    assert names[0] == "connect_redirected" and "sklookup_no_listener" in names
    assert len(names) == len(set(names)) == progs.table("counters").max_entries
    assert maps.listener_kinds() == {"inbound": 0, "hbone": 1}
    assert maps.be32_to_ip(maps.ip_to_be32("10.244.0.3")) == "10.244.0.3"
    assert maps.ip_to_be32("1.2.3.4").to_bytes(4, "little") == bytes([1, 2, 3, 4])


def test_cflags_reject_bad_knobs():
    with pytest.raises(loader.CaptureError) as ei:
        loader.check_pin_path("/sys/fs/bpf/has.dot")
    assert ei.value.reason == "bad_pin_dir"
    with pytest.raises(loader.CaptureError) as ei:
        loader.cflags_for(maps_pin_dir="/sys/fs/bpf/x/maps", ports=(0, 1, 2), mark=1,
                          fail_open=False)
    assert ei.value.reason == "bad_config"
    flags = loader.cflags_for(maps_pin_dir="/sys/fs/bpf/x/maps", ports=(1, 2, 3), mark=0x539,
                              fail_open=True)
    assert '-DMAPS_PIN_DIR="/sys/fs/bpf/x/maps"' in flags and "-DFAIL_OPEN=1" in flags
