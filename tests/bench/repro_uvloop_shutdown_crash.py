"""Standalone reproducer (not collected by pytest): uvloop 0.23 segfaults when a TCP transport is
garbage-collected while still open with a write_eof() shutdown pending. UVHandle.__dealloc__ calls
uv_close on the open handle; libuv then cancels the shutdown request and calls
__uv_stream_on_shutdown, which casts req.data (the object being freed, refcnt 0, never INCREF-ed
for the request) back to a UVStream: INCREF/DECREF re-enters dealloc and frees it twice.
Run: .venv/bin/python tests/bench/repro_uvloop_shutdown_crash.py        -> SIGSEGV (rc 139)
     .venv/bin/python tests/bench/repro_uvloop_shutdown_crash.py close  -> survives (close()
     INCREFs the handle until its close callback, so it is never freed open)."""
import asyncio, gc, sys, uvloop

class P(asyncio.Protocol):
    def connection_made(self, t): self.t = t       # cycle: protocol <-> transport
    def connection_lost(self, exc): pass

async def main(close_first):
    srv = await asyncio.get_running_loop().create_server(lambda: P(), "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    for _ in range(50):
        t, p = await asyncio.get_running_loop().create_connection(P, "127.0.0.1", port)
        t.pause_reading()
        t.write(b"x")
        t.write_eof()               # so uv_shutdown stays pending
        if close_first:
            t.abort()
        del t, p
        gc.collect()                # the cycle is collected while the handle is open
        await asyncio.sleep(0)
    srv.close()
    print("survived", "close_first" if close_first else "dropped-open")

uvloop.run(main(sys.argv[1:] == ["close"]))
