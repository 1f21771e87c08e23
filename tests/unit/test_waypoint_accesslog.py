"""The waypoint process's batched access log writes logging's own line format, one write per loop turn."""
import asyncio
import io
import logging

from waypoint.accesslog import BatchedLineHandler

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"  # mesh.proxy.bootstrap.setup_logging


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


def _record(msg: str, created: float) -> logging.LogRecord:
    r = logging.LogRecord("ambient.access", logging.INFO, __file__, 1, "%s", (msg,), None)
    r.created, r.msecs = created, (created - int(created)) * 1000
    return r


def test_lines_are_what_the_logging_formatter_writes():
    out = CountingStream()
    h = BatchedLineHandler(out)
    for t in (1796353500.0, 1796353500.0459, 1796353501.9991):   # same second, then the next
        h.emit(_record('[x] "GET / HTTP/1.1" 200', t))           # no running loop: written at once
    want = "".join(logging.Formatter(FORMAT).format(_record('[x] "GET / HTTP/1.1" 200', t)) + "\n"
                   for t in (1796353500.0, 1796353500.0459, 1796353501.9991))
    assert out.getvalue() == want and out.writes == 3


def test_one_write_per_loop_turn_and_line_matches_emit():
    out = CountingStream()
    h = BatchedLineHandler(out)

    async def burst():
        for i in range(50):
            h.line(f"request {i}")
        assert out.writes == 0                    # nothing yet: the batch goes at the end of the turn
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert out.writes == 1
        h.line("later")
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    asyncio.run(burst())
    lines = out.getvalue().splitlines()
    assert out.writes == 2 and len(lines) == 51
    assert all(ln.split(" ", 2)[2].startswith("INFO ambient.access request ") for ln in lines[:50])
    assert lines[50].endswith(" INFO ambient.access later")
    # The date part is logging's asctime: "YYYY-mm-dd HH:MM:SS,mmm".
    date, clock = lines[0].split(" ")[:2]
    assert len(date) == 10 and len(clock) == 12 and clock[8] == ","
