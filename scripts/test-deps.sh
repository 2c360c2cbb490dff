#!/bin/sh
# Installs what the test suite needs beyond Rust on a fresh Debian machine:
# a Python venv at $CARGO_TARGET_DIR/pyenv (default target/pyenv) with the
# `websockets` client, used by tests/python_client_interoperates.rs.
# Idempotent and silent when everything is already in place.
set -eu

cd "$(dirname "$0")/.."
WEBSOCKETS='websockets>=13,<16'   # keep in step with tests/python_client_interoperates.rs
target="${CARGO_TARGET_DIR:-target}"
venv="$target/pyenv"

apt_install() {
    if [ "$(id -u)" -eq 0 ]; then sudo=; else sudo=sudo; fi
    echo "test-deps: apt-get install $*" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv

mkdir -p "$target"
# The test takes the same lock, so the two never build the venv at once.
exec 9>"$target/pyenv.lock"
if command -v flock >/dev/null 2>&1; then flock 9; fi

if ! "$venv/bin/python" -c 'import websockets.asyncio.client' >/dev/null 2>&1; then
    if [ ! -x "$venv/bin/pip" ]; then
        rm -rf "$venv"
        if ! python3 -m venv "$venv" >/dev/null 2>&1; then
            # Debian splits venv/ensurepip into python3-venv.
            rm -rf "$venv"
            apt_install python3-venv
            python3 -m venv "$venv"
        fi
    fi
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$WEBSOCKETS"
    "$venv/bin/python" -c 'import websockets.asyncio.client'
fi
