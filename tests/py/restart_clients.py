"""Clients through a herald restart, for tests/restart_without_dropping_anyone.rs.

Usage: restart_clients.py WS_URL SUBSCRIBERS SECONDS [PAUSE_MS [ROLE]]

SUBSCRIBERS clients subscribe to channel `live`; a publisher publishes
1, 2, 3, ... there (with acks, pausing PAUSE_MS (5) between publishes,
each with an
idempotency key, retried on another connection if its connection closes
before the ack) for SECONDS. When the server closes a client (a restart),
it reconnects at once and resubscribes with `since`, expecting
`recovered: true`. Every client checks that it sees each offset exactly
once, in order, and that offset n carries the number n.

Prints "subscribed" once every client is subscribed (the driver restarts
the server then), and at the end one JSON line with what happened. Exits 1
on any gap, duplicate, refused connection or failed recovery.

ROLE `subscribers` runs no publisher (more processes of subscribers, so
that thousands of them do not share one Python thread): once the driver
has the publisher's count, it writes it on a line to this process's
standard input.
"""

import asyncio
import json
import resource
import sys
import time

from websockets.asyncio.client import connect

URL, SUBS, SECONDS = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
PAUSE = float(sys.argv[4]) / 1000 if len(sys.argv) > 4 else 0.005
PUBLISHES = len(sys.argv) <= 5 or sys.argv[5] != "subscribers"
# A socket per subscriber: as many as the hard limit allows.
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
stats = {"reconnects": 0, "refused": 0, "closes": {}, "published": 0, "max_back_ms": 0}
failures = []
close_times = []


async def open_ws():
    try:
        return await connect(URL, open_timeout=10)
    except Exception as e:  # noqa: BLE001 - a refused or failed connection
        stats["refused"] += 1
        failures.append(f"connection failed: {e!r}")
        raise


async def subscriber(k, subscribed, stop):
    ws = await open_ws()
    await ws.send(json.dumps({"op": "subscribe", "channel": "live", "id": "s"}))
    first = json.loads(await ws.recv())
    assert first["op"] == "subscribed", first
    epoch, last = first["epoch"], first["offset"]
    subscribed.release()
    while True:
        if stop.is_set() and last >= stats["published"]:
            await ws.close()
            return last
        try:
            m = json.loads(await asyncio.wait_for(ws.recv(), 0.5))
        except asyncio.TimeoutError:
            continue
        except Exception:  # noqa: BLE001 - closed by the server
            code = ws.close_code
            stats["closes"][str(code)] = stats["closes"].get(str(code), 0) + 1
            gone = time.monotonic()
            close_times.append(time.time())
            ws = await open_ws()
            stats["reconnects"] += 1
            await ws.send(json.dumps({"op": "subscribe", "channel": "live", "id": "s",
                                      "since": {"epoch": epoch, "offset": last}}))
            r = json.loads(await ws.recv())
            back = (time.monotonic() - gone) * 1000
            stats["max_back_ms"] = max(stats["max_back_ms"], round(back))
            if r.get("op") != "subscribed" or r.get("recovered") is not True:
                failures.append(f"client {k}: not recovered: {r}")
                return last
            continue
        if m.get("op") != "message":
            continue
        off = m["offset"]
        if off != last + 1 or m["data"] != off:
            failures.append(f"client {k}: after {last} got offset {off} data {m['data']}")
            return last
        last = off


async def publisher(stop):
    ws = await open_ws()
    n = 0
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline:
        n += 1
        while True:
            try:
                await ws.send(json.dumps({"op": "publish", "channel": "live", "data": n,
                                          "id": "p", "idempotency_key": f"k{n}"}))
                ack = json.loads(await ws.recv())
                if ack.get("op") == "ack":
                    assert ack["offset"] == n, ack
                    break
                failures.append(f"publish {n}: {ack}")
                return
            except Exception:  # noqa: BLE001 - closed by the restart: again
                ws = await open_ws()
        stats["published"] = n
        await asyncio.sleep(PAUSE)
    stop.set()
    await ws.close()


async def main():
    subscribed = asyncio.Semaphore(0)
    stop = asyncio.Event()
    subs = [asyncio.create_task(subscriber(k, subscribed, stop)) for k in range(SUBS)]
    for _ in range(SUBS):
        await subscribed.acquire()
    print("subscribed", flush=True)
    if PUBLISHES:
        await publisher(stop)
    else:
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        stats["published"] = int(line)
        stop.set()
    lasts = await asyncio.wait_for(asyncio.gather(*subs), 60)
    stats["short"] = sum(1 for x in lasts if x < stats["published"])
    if close_times:
        stats["close_spread_ms"] = round((max(close_times) - min(close_times)) * 1000)
        stats["first_close"], stats["last_close"] = min(close_times), max(close_times)
    print(json.dumps(stats), flush=True)
    if failures or stats["short"]:
        print("FAIL: " + "; ".join(failures[:5]), file=sys.stderr)
        sys.exit(1)


asyncio.run(main())
