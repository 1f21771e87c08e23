"""When a tunnel's TCP read is written to the TLS side at once instead of by the deferred flush (issue 11)."""
from __future__ import annotations

import pytest

from mesh.hbone.session import SMALL_READ, flush_at_once


@pytest.mark.parametrize("nbytes, tunnels, scheduled, now", [
    (41, 1, False, True),                  # a request on a connection of its own: no loop hop
    (SMALL_READ, 1, False, True),          # the largest read that still counts as small
    (SMALL_READ + 1, 1, False, False),     # bulk keeps the deferred flush
    (256 * 1024, 1, False, False),
    (41, 2, False, False),                 # another stream could share the record this iteration
    (41, 32, False, False),
    (41, 1, True, False),                  # a flush is already scheduled: join it, keep order
    (0, 1, False, True),
])
def test_flush_at_once(nbytes, tunnels, scheduled, now):
    assert flush_at_once(nbytes, tunnels, scheduled) is now
