"""How this control plane runs, decided once from its command line (pure, table-tested).

Two resource sources (YAML files, or list+watch of an API server), three CA sources (a
directory; the self-signed root's Secret, created once; a user's Secret), two listeners (a
Unix socket for local mode's nodes, TCP for a cluster's ztunnels) and two credentials for
proxies: a client certificate (local mode's node bootstrap certs, workload certs) and, in
Kubernetes mode, a projected ServiceAccount token verified with TokenReview.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = ["CaSource", "Mode", "ModeError", "Source", "select_mode", "parse_hostport"]


class Source(str, Enum):
    FILES = "files"
    KUBERNETES = "kubernetes"


class CaSource(str, Enum):
    DIRECTORY = "directory"        # --ca-dir: root-cert.pem/root-key.pem, created if empty
    SECRET = "secret"              # Kubernetes default: istio-ca-secret, created once
    USER_SECRET = "user_secret"    # --ca-from-secret NAME: the user's (cert-manager, cacerts)


class ModeError(ValueError):
    """Flags that do not make one way to run; says which and why."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Mode:
    source: Source
    ca: CaSource
    ca_dir: str | None = None
    ca_secret: str | None = None
    socket: str | None = None
    listen: tuple[str, int] | None = None
    health: tuple[str, int] | None = None
    namespace: str = "istio-system"
    token_audience: str | None = None
    """Accept projected ServiceAccount tokens for this audience (Kubernetes mode only)."""


def parse_hostport(value: str, flag: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ModeError(f"{flag} {value!r}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def select_mode(*, kubernetes: bool, files: bool, check: bool, ca_dir: str | None,
                ca_from_secret: str | None, socket: str | None, listen: str | None,
                health: str | None, namespace: str, token_audience: str) -> Mode:
    """The one Mode these flags mean, or ModeError."""
    if kubernetes and (files or check):
        raise ModeError("--kubernetes takes no FILEs and no --check")
    if ca_dir and ca_from_secret:
        raise ModeError("--ca-dir and --ca-from-secret are two CAs: give one")
    if ca_from_secret and not kubernetes:
        raise ModeError("--ca-from-secret reads a Secret: it needs --kubernetes")
    if not kubernetes and not ca_dir:
        raise ModeError("file mode keeps its CA in a directory: give --ca-dir")
    if not check and not socket and not listen:
        raise ModeError("nothing to serve on: give --socket PATH and/or --listen HOST:PORT")
    if ca_dir:
        ca = CaSource.DIRECTORY
    else:
        ca = CaSource.USER_SECRET if ca_from_secret else CaSource.SECRET
    return Mode(
        source=Source.KUBERNETES if kubernetes else Source.FILES, ca=ca, ca_dir=ca_dir,
        ca_secret=ca_from_secret, socket=socket,
        listen=parse_hostport(listen, "--listen") if listen else None,
        health=parse_hostport(health, "--health") if health else None,
        namespace=namespace,
        # Tokens are checked by the API server (TokenReview): only with one to ask.
        token_audience=token_audience if kubernetes else None)
