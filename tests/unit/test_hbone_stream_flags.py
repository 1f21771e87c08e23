"""The per-stream remote_closed/local_closed slots agree with the RFC 9113 state after every transition."""
from mesh.hbone.connection import _TRANSITIONS, H2Connection, Role, StreamState, _Stream


def test_closed_flags_follow_every_transition():
    closed_remote = {StreamState.HALF_CLOSED_REMOTE, StreamState.CLOSED}
    closed_local = {StreamState.HALF_CLOSED_LOCAL, StreamState.CLOSED}
    # Walk every path from OPEN through the table, so each flag value is reached the way the
    # connection reaches it (no state set by hand).
    paths = [[]]
    for _ in range(3):
        paths = [p + [a] for p in paths for a in ("send_end", "recv_end", "reset")] + paths
    seen = set()
    for path in paths:
        conn = H2Connection(Role.CLIENT)
        s = _Stream(1, 0, 0)
        conn._streams[1] = s
        for action in path:
            if (s.state, action) not in _TRANSITIONS:
                break
            conn._transition(s, action)
            seen.add((s.state, action))
            assert s.remote_closed == (s.state in closed_remote), (path, s.state)
            assert s.local_closed == (s.state in closed_local), (path, s.state)
    assert {new for (_, _), new in _TRANSITIONS.items()} == {st for st, _ in seen}
