"""CA Secrets (pure part): both user layouts (Istio cacerts, cert-manager tls) and our own
istio-ca-secret load into a CA that signs; what is missing or broken is named."""
from __future__ import annotations

import base64

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from controlplane.ca import CertificateAuthority
from controlplane.kube.ca_secret import CaSecretError, parse_ca_secret, self_signed_secret
from mesh.ca import build_csr, generate_key
from mesh.identity import SpiffeId
from tests.fakes import FakeClock, make_intermediate, pem_of

TD = "cluster.local"
ALICE = SpiffeId(trust_domain=TD, namespace="default", service_account="alice")


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _secret(data: dict[str, bytes | str], name: str = "cacerts") -> dict:
    return {"metadata": {"name": name, "namespace": "istio-system"},
            "data": {k: v if isinstance(v, str) else _b64(v) for k, v in data.items()}}


@pytest.fixture(scope="module")
def plugged() -> dict[str, bytes]:
    """An intermediate issuing CA under a corporate root, as an operator plugs in."""
    clock = FakeClock()
    root = CertificateAuthority.generate("corp", clock=clock)
    root_pem, root_key_pem, _ = root.to_pem()
    root_cert = x509.load_pem_x509_certificate(root_pem)
    root_key = serialization.load_pem_private_key(root_key_pem, None)
    cert, key = make_intermediate(root_cert, root_key, "issuing CA", clock.now())
    return {"cert": cert.public_bytes(serialization.Encoding.PEM), "key": pem_of(key), "root": root_pem}


def _load(secret: dict) -> CertificateAuthority:
    m = parse_ca_secret(secret)
    return CertificateAuthority.from_pem(m.cert, m.key, chain=m.chain, clock=FakeClock(), trust_domain=TD)


@pytest.mark.parametrize("layout", ["istio-cacerts", "cert-manager", "cert-manager-chain-in-tls.crt"])
def test_user_layouts_load_and_sign_under_the_users_root(plugged, layout):
    p = plugged
    data = {
        "istio-cacerts": {"ca-cert.pem": p["cert"], "ca-key.pem": p["key"], "root-cert.pem": p["root"],
                          "cert-chain.pem": p["cert"] + p["root"]},
        "cert-manager": {"tls.crt": p["cert"], "tls.key": p["key"], "ca.crt": p["root"]},
        "cert-manager-chain-in-tls.crt": {"tls.crt": p["cert"] + p["root"], "tls.key": p["key"], "ca.crt": ""},
    }[layout]
    ca = _load(_secret(data))
    assert ca.roots_pem == p["root"]
    chain = ca.sign_csr(build_csr(ALICE, generate_key()), ALICE, 3600)
    assert chain[-1] == p["root"] and len(chain) == 3


def test_our_own_secret_round_trips():
    ca = CertificateAuthority.generate(TD, clock=FakeClock())
    secret = self_signed_secret(ca, "istio-system")
    assert secret["metadata"] == {"name": "istio-ca-secret", "namespace": "istio-system",
                                  "labels": {"app.kubernetes.io/part-of": "ambient"}}
    assert _load(secret).roots_pem == ca.roots_pem


@pytest.mark.parametrize("data, reason, message", [
    ({}, "ca_secret_invalid", r"no CA in it: expected ca-cert.pem \+ ca-key.pem .* found keys \[\]"),
    ({"ca-cert.pem": b"x", "root-cert.pem": b"x"}, "ca_secret_invalid", r"found keys \['ca-cert.pem', 'root-cert.pem'\]"),
    ({"tls.crt": "not base64!", "tls.key": b"k"}, "ca_secret_invalid", "key tls.crt is not base64"),
])
def test_unusable_secrets_are_named(data, reason, message):
    with pytest.raises(CaSecretError, match=message) as e:
        parse_ca_secret(_secret(data))
    assert e.value.reason == reason
    assert "Secret istio-system/cacerts" in str(e.value)


def test_wrong_key_and_missing_issuers_name_the_secret_keys(plugged):
    other = CertificateAuthority.generate(TD, clock=FakeClock()).to_pem()[1]
    with pytest.raises(Exception, match="Secret istio-system/cacerts key tls.key: key does not match"):
        _load(_secret({"tls.crt": plugged["cert"], "tls.key": other, "ca.crt": plugged["root"]}))
    with pytest.raises(Exception, match="Secret istio-system/cacerts key ca-cert.pem: not self-signed"):
        _load(_secret({"ca-cert.pem": plugged["cert"], "ca-key.pem": plugged["key"]}))
