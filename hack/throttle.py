#!/usr/bin/env python3
"""A TCP forwarder whose answers (target to client) share one bandwidth limit, as the link to
a remote registry does: every connection through it together gets at most RATE MiB/s.

    throttle.py LISTEN_PORT TARGET_PORT RATE_MIB_PER_S

Loopback only. Used by hack/bench-proxy.sh (LINK_MIB) to put the upstream behind a link.
"""
import asyncio
import sys
import time

CHUNK = 64 * 1024


class Link:
    """One token bucket for every connection: each chunk takes its slot of the link's time."""

    def __init__(self, rate):
        self.rate = rate
        self.free_at = time.monotonic()

    async def send(self, n):
        now = time.monotonic()
        # A sleep that woke late does not cost the link its time: up to 50 ms of lag is made
        # up (a burst of at most 50 ms worth of bytes after a pause).
        start = max(self.free_at, now - 0.05)
        self.free_at = start + n / self.rate
        delay = self.free_at - now
        if delay > 0:
            await asyncio.sleep(delay)


async def pipe(reader, writer, link=None):
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            if link is not None:
                await link.send(len(data))
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


async def main():
    listen, target, rate = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    link = Link(rate * 1024 * 1024)

    async def handle(client_reader, client_writer):
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            pipe(client_reader, server_writer),
            pipe(server_reader, client_writer, link),
        )

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
