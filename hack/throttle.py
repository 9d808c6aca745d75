#!/usr/bin/env python3
"""A TCP forwarder standing in for the link to a remote registry: its answers (target to
client) share one bandwidth limit, every connection through it together getting at most RATE
MiB/s, and each direction is delayed by half of RTT milliseconds.

    throttle.py LISTEN_PORT TARGET_PORT RATE_MIB_PER_S [RTT_MS]

Loopback only. Used by hack/bench-proxy.sh (LINK_MIB, LINK_RTT_MS).
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


async def pipe(reader, writer, delay, link=None):
    """Copies reader to writer, each chunk delivered `delay` seconds after it was read."""
    queue = asyncio.Queue()

    async def deliver():
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                due, data = item
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            try:
                writer.close()
            except Exception:
                pass

    delivering = asyncio.ensure_future(deliver())
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            if link is not None:
                await link.send(len(data))
            queue.put_nowait((time.monotonic() + delay, data))
    except ConnectionError:
        pass
    finally:
        queue.put_nowait(None)
        await delivering


async def main():
    listen, target, rate = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    delay = (float(sys.argv[4]) if len(sys.argv) > 4 else 0.0) / 2000.0
    link = Link(rate * 1024 * 1024)

    async def handle(client_reader, client_writer):
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            pipe(client_reader, server_writer, delay),
            pipe(server_reader, client_writer, delay, link),
        )

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
