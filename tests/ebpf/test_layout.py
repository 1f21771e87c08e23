"""The Python side of the capture maps and of bpf(2) agrees with the compiled C (design rule 14).

ebpf.maps declares ctypes mirrors of include/types.h and ebpf.loader mirrors of the kernel's
``union bpf_attr`` members and info structs; ztunnel uses them without bcc.  Two independent
checks hold them to the compiled object:

* the build child (python -m ebpf.build) reports bcc's decoding of every map's key and value
  type from the compiled programs; it must equal the mirrors field by field;
* C static assertions generated from the mirrors are compiled (by bcc, in this test process):
  sizes, offsets, enum values, POD_UID_MAX, bpf_cmd numbers and bpf_attr offsets.

The build/pin cycle (knobs record, rebuild on other knobs) and the absence of bcc from the
process that uses the pins are tested here too.
"""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import textwrap

import pytest

from ebpf import loader, maps
from ebpf.capture import teardown_pins

pytestmark = pytest.mark.root

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cflags(pin: str, fail_open: bool = False) -> list[str]:
    return loader.cflags_for(maps_pin_dir=f"{pin}/maps", ports=(15001, 15006, 15008),
                             mark=0x539, fail_open=fail_open)


@pytest.fixture(scope="module")
def built():
    """A pin dir with the programs built by the child; yields (pin_dir, child's report)."""
    pin = f"/sys/fs/bpf/amb-layout{os.getpid()}"
    try:
        report = loader.run_build(pin, _cflags(pin))
        yield pin, report
    finally:
        teardown_pins(pin)
    assert not os.path.exists(pin)


def _describe(t: type) -> dict:
    return {"size": ctypes.sizeof(t),
            "fields": {f[0]: [getattr(t, f[0]).offset, getattr(t, f[0]).size]
                       for f in getattr(t, "_fields_", [])}}


def test_mirrors_match_bccs_view_of_the_compiled_maps(built):
    _, report = built
    assert set(report["layouts"]) == set(maps.MAP_TYPES)
    for name, (key, value) in maps.MAP_TYPES.items():
        got = report["layouts"][name]
        assert got["key"] == _describe(key), name
        if name.endswith("_listeners"):   # SOCKHASH: value is the int socket fd on update
            assert got["value"]["size"] == ctypes.sizeof(value), name
        else:
            assert got["value"] == _describe(value), name
            # field order too (json keeps it): the mirror lists fields as C does
            assert list(got["value"]["fields"]) == list(_describe(value)["fields"]), name
    assert maps.CaptureMaps.PodInfo is maps.PodInfo
    assert maps.PodInfo.uid.size == maps.header_define("POD_UID_MAX") == 128


def _struct_asserts(c_name: str, ctype: type, c_fields: dict[str, str] | None = None) -> list[str]:
    """sizeof and every field offset; `c_fields` maps a mirror field to its C member path."""
    out = [f"_Static_assert(sizeof({c_name}) == {ctypes.sizeof(ctype)}, \"size of {c_name}\");"]
    for fname, *_ in getattr(ctype, "_fields_", []):
        if fname.startswith("_pad") and c_fields is not None:
            continue
        member = (c_fields or {}).get(fname, fname)
        off = getattr(ctype, fname).offset
        out.append(f"_Static_assert(__builtin_offsetof({c_name}, {member}) == {off}, "
                   f"\"offset of {c_name}.{member}\");")
    return out


def _attr_asserts(member: str, ctype: type, rename: dict[str, str] | None = None) -> list[str]:
    """Offsets of a loader.Attr* mirror inside union bpf_attr (sizes may be a prefix)."""
    out = []
    for fname, *_ in ctype._fields_:
        if fname.startswith("_pad"):
            continue
        c = (rename or {}).get(fname, fname)
        off = getattr(ctype, fname).offset
        out.append(f"_Static_assert(__builtin_offsetof(union bpf_attr, {member}{c}) == {off}, "
                   f"\"bpf_attr {member}{c}\");")
    return out


def test_mirrors_match_the_c_compiler():
    checks = {"struct listener_key": maps.ListenerKey, "struct pod_info": maps.PodInfo,
              "struct conn_key": maps.ConnKey, "struct orig_dst": maps.OrigDst,
              "struct outbound_key": maps.OutboundKey, "struct dial_key": maps.DialKey,
              "__u32": maps.CaptureMaps.PodKey}
    lines = [line for c_name, t in checks.items() for line in _struct_asserts(c_name, t)]
    for enum in ("listener_kind", "capture_counter"):
        for name, value in maps.header_enum(enum).items():
            lines.append(f"_Static_assert({name} == {value}, \"{name}\");")
    lines.append(f"_Static_assert(POD_UID_MAX == {maps.header_define('POD_UID_MAX')}, \"uid\");")
    # bpf(2): command numbers, program/attach types, bpf_attr members, info structs
    for const in ("BPF_MAP_LOOKUP_ELEM", "BPF_MAP_UPDATE_ELEM", "BPF_MAP_DELETE_ELEM",
                  "BPF_MAP_GET_NEXT_KEY", "BPF_OBJ_PIN", "BPF_OBJ_GET", "BPF_OBJ_GET_INFO_BY_FD",
                  "BPF_LINK_CREATE", "BPF_LINK_UPDATE", "BPF_LINK_DETACH", "BPF_ANY"):
        lines.append(f"_Static_assert({const} == {getattr(loader, const)}, \"{const}\");")
    for const in ("PROG_TYPE_CGROUP_SOCK_ADDR", "PROG_TYPE_SOCK_OPS", "PROG_TYPE_CGROUP_SOCKOPT",
                  "PROG_TYPE_SK_LOOKUP"):
        lines.append(f"_Static_assert(BPF_{const} == {getattr(loader, const)}, \"{const}\");")
    for const in ("CGROUP_SOCK_OPS", "CGROUP_INET4_CONNECT", "CGROUP_INET6_CONNECT",
                  "CGROUP_GETSOCKOPT", "SK_LOOKUP"):
        lines.append(f"_Static_assert(BPF_{const} == {getattr(loader, 'ATTACH_' + const)}, "
                     f"\"{const}\");")
    lines += _attr_asserts("", loader.AttrMapElem)
    lines += _attr_asserts("", loader.AttrObj)
    lines += _attr_asserts("info.", loader.AttrInfo)
    lines += _attr_asserts("link_create.", loader.AttrLinkCreate)
    lines += _attr_asserts("link_update.", loader.AttrLinkUpdate)
    lines += _attr_asserts("link_detach.", loader.AttrLinkDetach)
    for c_name, t in (("struct bpf_map_info", loader.MapInfo),
                      ("struct bpf_link_info", loader.LinkInfo),
                      ("struct bpf_prog_info", loader.ProgInfo)):
        lines += [x for x in _struct_asserts(c_name, t, {}) if "sizeof" not in x]
    from bcc import BPF
    text = ("#include <uapi/linux/bpf.h>\n#include \"include/types.h\"\n"
            + "\n".join(lines))
    # raises ("Failed to compile") if any assertion fails
    BPF(text=text.encode(), cflags=[f"-I{loader.BPF_DIR}"]).cleanup()
    assert len(lines) > 60


def test_counters_and_kinds_from_types_h(built):
    pin, _ = built
    names = maps.counter_names()
    assert names[0] == "connect_redirected" and "sklookup_no_listener" in names
    fd = loader.obj_get(f"{pin}/maps/counters")
    try:
        assert len(names) == len(set(names)) == loader.map_info(fd).max_entries
    finally:
        loader.close_fd(fd)
    assert maps.listener_kinds() == {"inbound": 0, "hbone": 1}
    assert maps.be32_to_ip(maps.ip_to_be32("10.244.0.3")) == "10.244.0.3"
    assert maps.ip_to_be32("1.2.3.4").to_bytes(4, "little") == bytes([1, 2, 3, 4])


def test_pins_knobs_and_reuse(built):
    pin, report = built
    assert sorted(os.listdir(f"{pin}/progs")) == sorted([*loader.PROGRAMS, loader.KNOBS_LINK])
    assert loader.read_knobs(pin) == loader.knobs_for(_cflags(pin))
    with loader.Programs(pin, _cflags(pin)) as p:     # same knobs: reused, nothing built
        p.load_all()
        assert not p.built
        assert {n: loader.prog_id(p.prog_fd(n)) for n in loader.PROGRAMS} == report["progs"]


def test_other_knobs_or_a_half_build_rebuild():
    pin = f"/sys/fs/bpf/amb-knobs{os.getpid()}"
    try:
        with loader.Programs(pin, _cflags(pin)) as p:
            p.load_all()
            first = {n: loader.prog_id(p.prog_fd(n)) for n in loader.PROGRAMS}
            assert p.built
        with loader.Programs(pin, _cflags(pin, fail_open=True)) as p:   # other knobs
            p.load_all()
            assert p.built
            second = {n: loader.prog_id(p.prog_fd(n)) for n in loader.PROGRAMS}
            assert not set(first.values()) & set(second.values())
            assert "-DFAIL_OPEN=1" in loader.read_knobs(pin)["cflags"]
        os.unlink(f"{pin}/progs/{loader.KNOBS_LINK}")                 # a build that died
        with loader.Programs(pin, _cflags(pin, fail_open=True)) as p:
            p.load_all()
            assert p.built
        with loader.Programs(pin, _cflags(pin, fail_open=True)) as p:
            p.load_all()
            assert not p.built
    finally:
        teardown_pins(pin)
    assert not os.path.exists(pin)


def test_build_child_reports_errors():
    with pytest.raises(loader.CaptureError) as ei:
        loader.run_build("/tmp/amb-not-bpffs/x", [f"-I{loader.BPF_DIR}"])
    assert ei.value.reason == "pin_dir_not_bpffs" and not os.path.exists("/tmp/amb-not-bpffs")
    pin = f"/sys/fs/bpf/amb-badbuild{os.getpid()}"
    try:
        with pytest.raises(loader.CaptureError) as ei:
            loader.run_build(pin, [f"-I{loader.BPF_DIR}"])          # no MAPS_PIN_DIR: #error
        assert ei.value.reason == "compile_failed"
        assert not os.path.lexists(f"{pin}/progs/{loader.KNOBS_LINK}")
    finally:
        teardown_pins(pin)


def test_a_process_using_the_pins_maps_no_bcc_or_llvm(built):
    """What ztunnel runs (its modules + Programs/CaptureMaps on existing pins) loads no bcc."""
    pin, _ = built
    code = textwrap.dedent(f"""
        import json, sys
        import ztunnel.__main__, ztunnel.app, ebpf.capture, mesh.linux.cgroup
        from ebpf import loader, maps
        p = loader.Programs({pin!r}, {_cflags(pin)!r})
        p.load_all()
        m = maps.CaptureMaps(p)
        counters = m.counters()
        libs = sorted({{l.split()[-1] for l in open("/proc/self/maps")
                       if any(x in l.lower() for x in ("libbcc", "libllvm", "libclang"))}})
        print(json.dumps({{"built": p.built, "bcc": "bcc" in sys.modules, "libs": libs,
                          "counters": len(counters)}}))
        p.close()
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"built": False, "bcc": False, "libs": [],
                   "counters": len(maps.counter_names())}


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
