"""The build child: compile and load the capture programs with bcc, pin them, exit.

    python -m ebpf.build --pin-dir DIR --cflags '["-I...", "-DMAPS_PIN_DIR=\\"DIR/maps\\"", ...]'

Run by :func:`ebpf.loader.run_build` (ztunnel's ``Capture.start()``) so that bcc, libbcc and
LLVM live only in this short-lived process, never in ztunnel.  It

1. removes the knobs record ``<pin_dir>/progs/knobs`` (a build that dies from here on leaves
   none, so the next start builds again);
2. compiles and loads the programs (``loader.PROGRAMS``), one bcc module per ``.c``; the maps pin themselves
   under ``MAPS_PIN_DIR`` (``maps.h``), or are reopened if an earlier build pinned them;
3. pins each program at ``<pin_dir>/progs/<name>``, replacing an older pin (links attached to
   the old program keep it until ztunnel moves them over with ``BPF_LINK_UPDATE``);
4. writes the knobs record last: a symlink whose target is the knobs JSON (bpffs has no
   regular files);
5. prints one JSON line on stdout: ``{"ok": true, "progs": {name: id}, "layouts": {...}}`` or
   ``{"ok": false, "reason": ..., "error": ...}``.  ``layouts`` is bcc's view of every map's
   key and value type (size, and per field offset and size), which tests/ebpf/test_layout.py
   compares with the ctypes mirrors of ebpf/maps.py.

Compiler and verifier messages go to stderr (ztunnel's log).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
from collections.abc import Sequence

from .loader import (BPF_DIR, KNOBS_LINK, PROGRAMS, PROGS_DIR, CaptureError, check_pin_path,
                     knobs_for, obj_pin, prog_id)

MAP_NAMES = ("pending", "orig_dst", "inbound_listeners", "outbound_listeners", "pods", "ztunnel_dials",
             "counters")


class BccPrograms:
    """The bcc modules of the capture programs (this process only)."""

    def __init__(self, cflags: Sequence[str]):
        self._cflags = list(cflags)
        self._modules: dict[str, object] = {}   # source file -> bcc.BPF
        self._progs: dict[str, int] = {}

    def __enter__(self) -> "BccPrograms":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _module(self, source: str):
        mod = self._modules.get(source)
        if mod is None:
            from bcc import BPF
            try:
                mod = BPF(src_file=str(BPF_DIR / source).encode(), cflags=self._cflags)
            except Exception as e:  # bcc raises bare Exception, details on stderr
                raise CaptureError("compile_failed", f"bcc could not compile {source}: {e} "
                                  "(compiler output in the log)") from e
            self._modules[source] = mod
        return mod

    def prog_fd(self, name: str) -> int:
        """Load (once) and return the fd of program `name` (a key of PROGRAMS)."""
        fd = self._progs.get(name)
        if fd is None:
            spec = PROGRAMS[name]
            try:
                fn = self._module(spec.source).load_func(spec.function.encode(), spec.prog_type,
                                                         attach_type=spec.attach_type)
            except CaptureError:
                raise
            except Exception as e:
                raise CaptureError("load_failed", f"the kernel refused {spec.function}: {e} "
                                  "(verifier log in the log)") from e
            fd = self._progs[name] = fn.fd
        return fd

    def _any_module(self):
        if not self._modules:
            self.prog_fd("connect4")
        return next(iter(self._modules.values()))

    def _table_type(self, name: str, which: str) -> type:
        from bcc import BPF, libbcc
        fn = libbcc.lib.bpf_table_key_desc if which == "key" else libbcc.lib.bpf_table_leaf_desc
        desc = fn(self._any_module().module, name.encode())
        if not desc:
            raise CaptureError("no_such_map", f"no map {name!r} in the capture programs")
        return BPF._decode_table_type(json.loads(desc))

    def layouts(self) -> dict:
        """bcc's key/value types of every map: {map: {"key"|"value": {"size", "fields"}}}, with
        fields {name: [offset, size]} (empty for scalars)."""
        def describe(t: type) -> dict:
            fields = {f[0]: [getattr(t, f[0]).offset, getattr(t, f[0]).size]
                      for f in getattr(t, "_fields_", [])}
            return {"size": ctypes.sizeof(t), "fields": fields}
        return {m: {"key": describe(self._table_type(m, "key")),
                    "value": describe(self._table_type(m, "leaf"))} for m in MAP_NAMES}

    def close(self) -> None:
        for mod in self._modules.values():
            try:
                mod.cleanup()
            except Exception:  # noqa: BLE001 - closing: nothing useful to do with it
                pass
        self._modules.clear()
        self._progs.clear()


def build(pin_dir: str, cflags: Sequence[str]) -> dict:
    """Steps 1-4 of the module doc; returns the report of step 5."""
    check_pin_path(pin_dir)
    progs_dir = f"{pin_dir}/{PROGS_DIR}"
    for sub in ("maps", PROGS_DIR):
        os.makedirs(f"{pin_dir}/{sub}", exist_ok=True)
    knobs_link = f"{progs_dir}/{KNOBS_LINK}"
    if os.path.lexists(knobs_link):
        os.unlink(knobs_link)
    with BccPrograms(cflags) as bp:
        ids = {}
        for name in PROGRAMS:
            fd = bp.prog_fd(name)
            path = f"{progs_dir}/{name}"
            if os.path.lexists(path):
                os.unlink(path)
            obj_pin(fd, path)
            ids[name] = prog_id(fd)
        layouts = bp.layouts()
    os.symlink(json.dumps(knobs_for(cflags), separators=(",", ":")), knobs_link)
    return {"ok": True, "progs": ids, "layouts": layouts}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ebpf.build", description=__doc__.split("\n")[0])
    ap.add_argument("--pin-dir", required=True)
    ap.add_argument("--cflags", required=True, help="JSON list (ebpf.loader.cflags_for)")
    a = ap.parse_args(argv)
    try:
        report = build(a.pin_dir.rstrip("/"), json.loads(a.cflags))
    except CaptureError as e:
        report = {"ok": False, "reason": e.reason, "error": e.strerror, "errno": e.errno or 0}
    except OSError as e:
        report = {"ok": False, "reason": "build_failed", "error": str(e), "errno": e.errno or 0}
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
