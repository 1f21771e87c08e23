"""PEM armour: the base64 blocks between BEGIN/END lines, decoded to DER and encoded back."""
from __future__ import annotations

import base64
import binascii
import re

__all__ = ["PemError", "decode_blocks", "encode"]

# RFC 7468 "strict" framing; text outside blocks (bundle comments) is ignored, as OpenSSL does.
_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n([A-Za-z0-9+/=\s]*?)-----END \1-----")


class PemError(ValueError):
    """No block with the wanted label, or a block whose body is not valid base64."""


def decode_blocks(data: bytes, labels: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """(label, DER) of every block in `data` whose label is one of `labels`, in order."""
    out = []
    for m in _BLOCK.finditer(data):
        label = m.group(1).decode("ascii")
        if label not in labels:
            continue
        try:
            der = base64.b64decode(b"".join(m.group(2).split()), validate=True)
        except binascii.Error as e:
            raise PemError(f"bad base64 in a {label} block: {e}") from None
        if not der:
            raise PemError(f"empty {label} block")
        out.append((label, der))
    if not out:
        raise PemError(f"no {' or '.join(labels)} PEM block")
    return out


def encode(label: str, der: bytes) -> bytes:
    """One block, 64 base64 characters a line, as OpenSSL and cryptography write it."""
    b64 = base64.b64encode(der)
    lines = b"\n".join(b64[i:i + 64] for i in range(0, len(b64), 64))
    return b"-----BEGIN %s-----\n%s\n-----END %s-----\n" % (label.encode(), lines, label.encode())
