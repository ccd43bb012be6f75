"""Measure the websocket clients kimiha could use for Binance's combined stream: CPU per message.

A server in a child process writes the JSON of the shipped tape's first N lines as websocket text frames in
one go (a bare asyncio server: the handshake, then every frame, then a close), so the client reads as fast as
it can and the server never paces it. Each client, in this process, receives every frame and does what the live feed
does with it: stamps the receive time (``time.time_ns()``) and builds the tape line ``b"<ns> <json>"``. The
figure is this process's CPU time (``time.process_time``) per message, which the server's own speed does not
enter; rounds interleave the clients and the medians are printed, with each client's ratio to picows.

    python benchmarks/ws_clients.py [--messages 50000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import itertools
import multiprocessing
import socket
import statistics
import sys
import time
from typing import Any


def _payloads(n: int) -> list[bytes]:
    from kimiha.venues.binance import iter_lines, recorded_tape

    out = []
    for line in itertools.islice(iter_lines(recorded_tape()), n * 2):
        body = line.partition(b" ")[2]
        if body.startswith(b'{"stream"'):
            out.append(body)
        if len(out) == n:
            break
    return out


def _frames(payloads: list[bytes]) -> bytes:
    """Server-to-client text frames (unmasked, RFC 6455 5.2), then a close frame (1000)."""
    out = bytearray()
    for p in payloads:
        n = len(p)
        if n < 126:
            out += bytes((0x81, n))
        elif n < 65536:
            out += bytes((0x81, 126)) + n.to_bytes(2, "big")
        else:
            out += bytes((0x81, 127)) + n.to_bytes(8, "big")
        out += p
    out += b"\x88\x02\x03\xe8"
    return bytes(out)


def _serve(port: int, n: int, ready: Any) -> None:  # child process
    # A bare asyncio server: the handshake, then every frame in one write. The kernel hands the bytes to the
    # client as fast as the client reads, so the client's own cost is what is measured, never the server's.
    payloads = _payloads(n)
    blob = _frames(payloads)
    guid = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        key = b""
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-key":
                key = value.strip()
        accept = base64.b64encode(hashlib.sha1(key + guid).digest())
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        writer.write(blob)
        await writer.drain()
        writer.close()  # after the close frame: a client waiting for the server to end the TCP connection need not

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        ready.set()
        async with server:
            await server.serve_forever()

    asyncio.run(main())


async def _picows(url: str) -> int:
    import picows

    lines: list[bytes] = []

    class Listener(picows.WSListener):
        def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
            if frame.msg_type is picows.WSMsgType.TEXT:
                lines.append(b"%d %b" % (time.time_ns(), frame.get_payload_as_bytes()))
            elif frame.msg_type is picows.WSMsgType.CLOSE:
                transport.disconnect()

    transport, _ = await picows.ws_connect(Listener, url)
    await transport.wait_disconnected()
    return len(lines)


async def _websockets(url: str) -> int:
    import websockets

    lines: list[bytes] = []
    async with websockets.connect(url, max_size=None, compression=None) as ws:
        try:
            while True:
                msg = await ws.recv(decode=False)
                lines.append(b"%d %b" % (time.time_ns(), msg))
        except websockets.ConnectionClosed:
            pass
    return len(lines)


async def _aiohttp(url: str) -> int:
    import aiohttp

    lines: list[bytes] = []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url, autoping=True, max_msg_size=0, compress=0) as ws:
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    lines.append(b"%d %b" % (time.time_ns(), msg.data.encode()))
    return len(lines)


CLIENTS = {"picows": _picows, "websockets": _websockets, "aiohttp": _aiohttp}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    import importlib.util

    missing = [name for name in CLIENTS if importlib.util.find_spec(name) is None]
    if "picows" in missing or importlib.util.find_spec("uvloop") is None:
        print("ws_clients: needs picows and uvloop (pip install 'kimiha[live]')", file=sys.stderr)
        return 1
    clients = {name: client for name, client in CLIENTS.items() if name not in missing}
    for name in missing:
        print(f"ws_clients: {name} is not installed: skipped (pip install {name} to compare it)", file=sys.stderr)
    import uvloop

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ready = multiprocessing.Event()
    server = multiprocessing.Process(target=_serve, args=(port, args.messages, ready), daemon=True)
    server.start()
    try:
        if not ready.wait(60):
            print("server did not start", file=sys.stderr)
            return 1
        url = f"ws://127.0.0.1:{port}/stream"
        cpu: dict[str, list[float]] = {k: [] for k in clients}
        for _ in range(args.rounds):
            for name, client in clients.items():
                t0 = time.process_time()
                got = uvloop.run(client(url))
                spent = time.process_time() - t0
                if got != args.messages:
                    print(f"{name}: received {got} of {args.messages}", file=sys.stderr)
                    return 1
                cpu[name].append(spent / got * 1e9)
        base = statistics.median(cpu["picows"])
        print(f"{'client':<12} {'CPU ns/message (median of ' + str(args.rounds) + ')':>34} {'vs picows':>10}")
        for name, values in cpu.items():
            med = statistics.median(values)
            print(f"{name:<12} {med:>34,.0f} {med / base:>9.2f}x")
    finally:
        server.kill()
        server.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
