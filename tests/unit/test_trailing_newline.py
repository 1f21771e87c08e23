"""Anchored patterns refuse a trailing newline: Python's `$` matches before one, so
`re.match("^name$", "name\\n")` passes. Every validator that checks a whole name uses fullmatch."""
from __future__ import annotations

import pytest

from mesh.config import ConfigErrors, parse_text
from mesh.hbone.connect_rules import validate_connect
from mesh.identity import IdentityError, NodeId, SpiffeId, parse_identity
from mesh.linux.netns import NetnsError, _check_name


@pytest.mark.parametrize("uri", ["spiffe://td/ns/a/sa/b\n", "spiffe://td\n/ns/a/sa/b", "spiffe://td/ns/a\n/sa/b",
                                 "spiffe://td/ambient/node/n1\n"])
def test_identities(uri):
    with pytest.raises(IdentityError):
        parse_identity(uri)
    assert parse_identity(uri.replace("\n", "")).uri == uri.replace("\n", "")


def test_identity_fields():
    for kw in ({"trust_domain": "td\n"}, {"namespace": "a\n"}, {"service_account": "b\n"}):
        with pytest.raises(IdentityError):
            SpiffeId(**({"trust_domain": "td", "namespace": "a", "service_account": "b"} | kw))
    with pytest.raises(IdentityError):
        NodeId(trust_domain="td", node="n1\n")


CONNECT = [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:8080")]


@pytest.mark.parametrize("headers,reason", [
    ([(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:8080\n")], "bad_authority"),
    (CONNECT + [(b"x-a\n", b"1")], "invalid_header_name"),
])
def test_hbone_connect(headers, reason):
    assert validate_connect(headers) == reason
    assert validate_connect([(n.rstrip(b"\n"), v.rstrip(b"\n")) for n, v in headers])[0] == "10.0.0.1:8080"


@pytest.mark.parametrize("doc", [
    "apiVersion: v1\nkind: Namespace\nmetadata: {name: \"demo\\n\"}\n",
    "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {\"app\\n\": x}}\n",
    "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs, namespace: demo}\n"
    "spec: {hosts: [reviews], http: [{match: [{headers: {\"end-user\\n\": {exact: j}}}],"
    " route: [{destination: {host: reviews}}]}]}\n",
])
def test_config_names(doc):
    with pytest.raises(ConfigErrors):
        parse_text(doc, "t.yaml")
    parse_text(doc.replace("\\n", ""), "t.yaml")


def test_netns_names():
    with pytest.raises(NetnsError):
        _check_name("amb-n1\n")
    assert _check_name("amb-n1") == "amb-n1"
