#!/usr/bin/env python3
"""Demo/test app: a TCP echo server that first sends one line saying who answered.

    hello from <pod> (<namespace>) local=<ip:port> peer=<ip:port>

`local` is the address the connection arrived at (the original destination); `peer` is the
client's address as this pod sees it. Then every byte received is sent back. With
`--reset-on-line WORD`, a connection whose data holds the line WORD is reset (RST, not FIN):
a backend failing mid-stream, for fault tests.
"""
import argparse
import asyncio
import os
import resource
import socket

RESET_ON = None


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.t = transport
        local = "%s:%d" % transport.get_extra_info("sockname")[:2]
        peer = "%s:%d" % transport.get_extra_info("peername")[:2]
        pod = os.environ.get("POD_NAME", "?")
        ns = os.environ.get("POD_NAMESPACE", "?")
        transport.write(f"hello from {pod} ({ns}) local={local} peer={peer}\n".encode())

    def data_received(self, data):
        if RESET_ON is not None and RESET_ON in b"\n" + data:
            sock = self.t.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            self.t.abort()
            return
        self.t.write(data)

    def eof_received(self):
        return False  # close our side too once the client has finished sending


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--reset-on-line", default=None)
    a = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # one fd per connection (load tests)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    global RESET_ON
    if a.reset_on_line:
        RESET_ON = b"\n" + a.reset_on_line.encode() + b"\n"
    server = await asyncio.get_running_loop().create_server(Echo, "0.0.0.0", a.port, reuse_address=True,
                                                                backlog=1024)
    print(f"echo listening on :{a.port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
