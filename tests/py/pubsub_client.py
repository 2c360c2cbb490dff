#!/usr/bin/env python3
"""Talks protocol.md to a running herald with the Python `websockets`
client (not tungstenite), so a framing bug shared by both ends of one
library cannot hide.

Usage: pubsub_client.py ws://HOST:PORT/ws
Exits 0 when every check passed; otherwise prints what failed and exits 1.
Needs websockets >= 13 (the `websockets.asyncio` client).
"""

import asyncio
import json
import sys

from websockets.asyncio.client import connect

TIMEOUT = 10.0
CHANNEL = "py-news"


class CheckFailed(Exception):
    pass


def check(cond, what):
    if not cond:
        raise CheckFailed(what)
    print(f"ok: {what}", flush=True)


async def recv(ws, who):
    try:
        return await asyncio.wait_for(ws.recv(), TIMEOUT)
    except asyncio.TimeoutError:
        raise CheckFailed(f"{who}: nothing received within {TIMEOUT}s") from None


async def recv_json(ws, who):
    msg = await recv(ws, who)
    if not isinstance(msg, str):
        raise CheckFailed(f"{who}: expected a text message, got binary {msg!r}")
    try:
        return msg, json.loads(msg)
    except ValueError:
        raise CheckFailed(f"{who}: server sent invalid JSON: {msg!r}") from None


async def send(ws, message):
    await asyncio.wait_for(ws.send(message), TIMEOUT)


async def sync(ws, who, ping_id="x"):
    """Sends an `op: ping` and returns every message received before its pong."""
    await send(ws, json.dumps({"op": "ping", "id": ping_id}))
    before = []
    while True:
        raw, msg = await recv_json(ws, who)
        if msg == {"op": "pong", "id": ping_id}:
            return before
        before.append(raw)


async def main(url):
    # No automatic keepalive pings: the one WebSocket ping below is ours.
    opts = dict(ping_interval=None, open_timeout=TIMEOUT, close_timeout=TIMEOUT)
    sub = await asyncio.wait_for(connect(url, **opts), TIMEOUT)
    pub = await asyncio.wait_for(connect(url, **opts), TIMEOUT)

    # subscribe
    await send(sub, json.dumps({"op": "subscribe", "channel": CHANNEL, "id": "s1"}))
    _, reply = await recv_json(sub, "subscriber")
    check(
        reply == {"op": "subscribed", "channel": CHANNEL, "id": "s1"},
        f"subscribe is confirmed (got {reply})",
    )

    # publish with an id: ack to the publisher, data byte for byte to the subscriber
    data = '{"b": [1, 2.50, "x"], "u": "h\\u00e9llo é"}'
    await send(
        pub, '{"op":"publish","channel":"%s","data":%s,"id":7}' % (CHANNEL, data)
    )
    _, reply = await recv_json(pub, "publisher")
    check(reply == {"op": "ack", "id": 7}, f"publish is acked with its id (got {reply})")
    raw, msg = await recv_json(sub, "subscriber")
    check(
        msg == {"op": "message", "channel": CHANNEL, "data": json.loads(data)},
        f"subscriber receives the message (got {raw})",
    )
    check(
        raw == '{"op":"message","channel":"%s","data":%s}' % (CHANNEL, data),
        f"data is passed through byte for byte (got {raw})",
    )

    # the publisher never receives its own message
    before = await sync(pub, "publisher")
    check(before == [], f"publisher got nothing before its pong (got {before})")

    # binary publish: n, channel, payload; delivered in the same layout
    payload = bytes(range(256)) + b"\x00\xff"
    frame = bytes([len(CHANNEL)]) + CHANNEL.encode() + payload
    await send(pub, frame)
    got = await recv(sub, "subscriber")
    check(isinstance(got, bytes), f"binary publish arrives as a binary message ({type(got).__name__})")
    check(got == frame, f"binary delivery has the same layout and bytes ({len(got)} bytes)")
    before = await sync(pub, "publisher")
    check(before == [], f"no reply or echo for a binary publish (got {before})")

    # fragmented text message: websockets sends an iterable of str as fragments
    fragments = [
        '{"op":"publish","chan',
        'nel":"%s","data":{"frag' % CHANNEL,
        'mented":"ü✓"},',
        '"id":"f1"}',
    ]
    await send(pub, fragments)
    _, reply = await recv_json(pub, "publisher")
    check(reply == {"op": "ack", "id": "f1"}, f"fragmented publish is acked (got {reply})")
    raw, msg = await recv_json(sub, "subscriber")
    check(
        raw == '{"op":"message","channel":"%s","data":{"fragmented":"ü✓"}}' % CHANNEL,
        f"fragmented publish is delivered reassembled (got {raw})",
    )

    # the subscriber got nothing else
    before = await sync(sub, "subscriber", "y")
    check(before == [], f"subscriber got nothing unexpected (got {before})")

    # WebSocket-level ping gets a pong carrying the same payload
    pong_waiter = await asyncio.wait_for(sub.ping(b"herald-py"), TIMEOUT)
    try:
        await asyncio.wait_for(pong_waiter, TIMEOUT)
    except asyncio.TimeoutError:
        raise CheckFailed("no pong for a WebSocket ping") from None
    check(True, "WebSocket ping is answered with a pong")

    # clean close: 1000 sent, 1000 echoed, handshake complete
    for ws, who in ((pub, "publisher"), (sub, "subscriber")):
        await asyncio.wait_for(ws.close(code=1000, reason="bye"), TIMEOUT)
        rcvd = ws.protocol.close_rcvd
        check(rcvd is not None, f"{who}: server answered the close handshake")
        check(rcvd.code == 1000, f"{who}: server echoed close code 1000 (got {rcvd.code})")
        check(ws.close_code == 1000, f"{who}: connection closed with 1000 ({ws.close_code})")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: pubsub_client.py ws://HOST:PORT/ws", file=sys.stderr)
        sys.exit(2)
    try:
        asyncio.run(asyncio.wait_for(main(sys.argv[1]), 60))
    except CheckFailed as e:
        print(f"FAILED: {e}", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # connection refused, closed early, timeouts...
        print(f"FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    print("all checks passed")
