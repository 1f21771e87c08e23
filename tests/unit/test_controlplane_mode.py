"""controlplane.mode: which source, CA, listeners and proxy credentials a command line means."""
from __future__ import annotations

import pytest

from controlplane.mode import CaSource, ModeError, Source, select_mode

BASE = dict(kubernetes=False, files=True, check=False, ca_dir="/ca", ca_from_secret=None, socket="/s",
            listen=None, health=None, namespace="istio-system", token_audience="istio-ca")


@pytest.mark.parametrize("flags, source, ca, listen, audience", [
    ({}, Source.FILES, CaSource.DIRECTORY, None, None),
    ({"listen": "127.0.0.1:15012"}, Source.FILES, CaSource.DIRECTORY, ("127.0.0.1", 15012), None),
    ({"kubernetes": True, "files": False, "ca_dir": None}, Source.KUBERNETES, CaSource.SECRET, None, "istio-ca"),
    ({"kubernetes": True, "files": False, "ca_dir": None, "ca_from_secret": "cacerts", "socket": None,
      "listen": ":15012"}, Source.KUBERNETES, CaSource.USER_SECRET, ("0.0.0.0", 15012), "istio-ca"),
    ({"kubernetes": True, "files": False}, Source.KUBERNETES, CaSource.DIRECTORY, None, "istio-ca"),
    ({"check": True, "socket": None}, Source.FILES, CaSource.DIRECTORY, None, None),
])
def test_modes(flags, source, ca, listen, audience):
    m = select_mode(**{**BASE, **flags})
    assert (m.source, m.ca, m.listen, m.token_audience) == (source, ca, listen, audience)


@pytest.mark.parametrize("flags, message", [
    ({"kubernetes": True}, "--kubernetes takes no FILEs"),
    ({"kubernetes": True, "files": False, "check": True}, "--kubernetes takes no FILEs and no --check"),
    ({"ca_from_secret": "cacerts", "ca_dir": None}, "--ca-from-secret reads a Secret: it needs --kubernetes"),
    ({"kubernetes": True, "files": False, "ca_from_secret": "cacerts"}, "--ca-dir and --ca-from-secret are two CAs"),
    ({"ca_dir": None}, "file mode keeps its CA in a directory: give --ca-dir"),
    ({"socket": None}, "nothing to serve on"),
    ({"listen": "15012"}, "--listen '15012': expected HOST:PORT"),
    ({"health": "x:99999"}, "--health 'x:99999': expected HOST:PORT"),
])
def test_flags_that_make_no_mode_say_why(flags, message):
    with pytest.raises(ModeError, match=message.replace("(", r"\(")):
        select_mode(**{**BASE, **flags})
