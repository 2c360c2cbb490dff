#!/usr/bin/env python3
"""Uses the Python `pusher` server library, unchanged, against a running
herald: triggers events (one channel, several, excluding a socket_id, a
batch), queries channels, a channel and a presence channel's users, and
makes requests herald must refuse (wrong secret, unknown app id).

Run by tests/pusher_python.rs, which subscribed WebSocket clients first and
checks both what they received and what this prints.

Environment: HERALD_HOST, HERALD_PORT, APP_ID, APP_KEY, APP_SECRET,
EXCLUDE_SOCKET_ID (a subscriber of py-news the excluding trigger skips).
Prints one line {"result": {...}} and exits 0; a request that fails where
it should work raises, printing the traceback, and exits 1.
"""

import importlib.metadata
import json
import os
import sys

import pusher


def env(name):
    value = os.environ.get(name)
    if not value:
        sys.exit(f"FAIL: environment variable {name} is not set")
    return value


HOST = env("HERALD_HOST")
PORT = int(env("HERALD_PORT"))
APP_ID = env("APP_ID")
KEY = env("APP_KEY")
SECRET = env("APP_SECRET")
EXCLUDE = env("EXCLUDE_SOCKET_ID")


def client(app_id=APP_ID, secret=SECRET):
    return pusher.Pusher(
        app_id=app_id, key=KEY, secret=secret, host=HOST, port=PORT, ssl=False, timeout=10
    )


def error_of(call):
    """The exception a request raises (type and message), or None."""
    try:
        call()
    except Exception as e:  # noqa: BLE001 - reported to the test as data
        return {"type": type(e).__name__, "message": str(e)}
    return None


def main():
    p = client()
    out = {"library_version": importlib.metadata.version("pusher")}

    out["trigger"] = p.trigger("py-news", "py-event", {"from": "python"})
    out["trigger_multi"] = p.trigger(["py-news", "py-other"], "py-multi", "plain text")
    out["trigger_excluding"] = p.trigger("py-news", "py-excluded", {"x": 1}, socket_id=EXCLUDE)
    out["trigger_batch"] = p.trigger_batch(
        [
            {"channel": "py-news", "name": "py-batch", "data": {"i": 1}},
            {"channel": "py-other", "name": "py-batch", "data": {"i": 2}},
        ]
    )

    # GET requests: the library signs a body_md5 of the empty body.
    out["channels"] = p.channels_info()
    out["channels_py"] = p.channels_info(prefix_filter="py-")
    out["channels_presence"] = p.channels_info(prefix_filter="presence-", attributes=["user_count"])
    out["channel_news"] = p.channel_info("py-news", attributes=["subscription_count"])
    out["channel_presence"] = p.channel_info("presence-py", attributes=["user_count"])
    out["channel_unused"] = p.channel_info("py-unused")
    out["users"] = p.users_info("presence-py")

    wrong = client(secret="not-the-secret")
    out["bad_secret_trigger"] = error_of(lambda: wrong.trigger("py-news", "py-nope", {}))
    out["bad_secret_get"] = error_of(lambda: wrong.channels_info())
    unknown = client(app_id="999999")
    out["unknown_app_trigger"] = error_of(lambda: unknown.trigger("py-news", "py-nope", {}))
    out["unknown_app_get"] = error_of(lambda: unknown.channels_info())

    print(json.dumps({"result": out}), flush=True)


if __name__ == "__main__":
    main()
