"""The waypoint loads h2 only when an HTTP/2 peer appears (~1 MB of RSS otherwise)."""
import subprocess
import sys

CODE = """
import sys
import waypoint.__main__, waypoint.app, waypoint.inbound, waypoint.pipeline, waypoint.upstream
def h2_loaded():
    return sorted(m for m in sys.modules if m.split('.')[0] in ('h2', 'hyperframe') or m.startswith('waypoint.http2.')
                  and m != 'waypoint.http2.base')
assert not h2_loaded(), h2_loaded()
import waypoint.http2 as w
assert w.PREFACE.startswith(b'PRI * HTTP/2.0') and w.H2Settings(max_header_list_size=1).max_header_list_size == 1
from waypoint.http2 import H2Downstream, ServerConnection
assert 'h2.connection' in sys.modules and H2Downstream.__module__ == 'waypoint.http2.downstream'
try:
    w.Nope
except AttributeError as e:
    assert "no attribute 'Nope'" in str(e), e
else:
    raise AssertionError('no AttributeError')
print('ok')
"""


def test_h2_loads_on_first_use_only():
    p = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stdout + p.stderr
