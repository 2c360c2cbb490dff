"""A wss:// client with Python's `ssl` and `websockets`, for tests/tls.rs.

Usage: tls_client.py WSS_URL CA_FILE

Subscribes on one connection and publishes from another: a small message,
one larger than a TLS record (16 KiB), and 500 in a row, checking each
arrives whole and in order. Exits 0 on success, prints the failure and
exits 1 otherwise.
"""

import asyncio
import json
import ssl
import sys

from websockets.asyncio.client import connect


async def main(url, ca_file):
    ctx = ssl.create_default_context(cafile=ca_file)
    async with connect(url, ssl=ctx, max_size=None) as sub, connect(url, ssl=ctx) as pub:
        await sub.send(json.dumps({"op": "subscribe", "channel": "tls", "id": "s"}))
        reply = json.loads(await asyncio.wait_for(sub.recv(), 10))
        assert reply["op"] == "subscribed", reply
        for data in ["hello over TLS", "x" * 40000]:
            await pub.send(json.dumps({"op": "publish", "channel": "tls", "data": data}))
            m = json.loads(await asyncio.wait_for(sub.recv(), 10))
            assert m["op"] == "message" and m["data"] == data, m["data"][:80]
        for n in range(500):
            await pub.send(json.dumps({"op": "publish", "channel": "tls", "data": n}))
        got = [json.loads(await asyncio.wait_for(sub.recv(), 10))["data"] for _ in range(500)]
        assert got == list(range(500)), got[:10]
        assert sub.transport.get_extra_info("ssl_object").selected_alpn_protocol() in (None, "http/1.1")
    print("ok")


if __name__ == "__main__":
    try:
        asyncio.run(main(sys.argv[1], sys.argv[2]))
    except Exception as e:  # noqa: BLE001 - any failure fails the test
        print(f"FAIL: {e!r}", file=sys.stderr)
        sys.exit(1)
