#!/bin/sh
# Installs what the test suite needs beyond Rust on a fresh Debian machine:
# - a Python venv at $CARGO_TARGET_DIR/pyenv (default target/pyenv) with the
#   `websockets` client (tests/python_client_interoperates.rs) and the
#   `pusher` server library (tests/pusher_python.rs);
# - Node.js with pusher-js and the Node `pusher` library in
#   tests/js/node_modules, exactly as tests/js/package-lock.json pins them
#   (tests/pusher_clients.rs);
# - promtool (Debian's prometheus package), which checks /metrics
#   (tests/metrics_are_valid_prometheus.rs);
# - curl and openssl, which the README's examples use
#   (tests/readme_examples_run.rs);
# - redis-server and redis-cli (Debian's redis-server package), and
#   nats-server (Debian's nats-server package, with JetStream), which the
#   cluster tests start on loopback ports of their own (tests/cluster.rs);
# - Chromium (Debian's chromium package), in which tests/console.rs drives
#   the debug console with puppeteer-core (tests/js);
# - PostgreSQL (Debian's postgresql package), which tests/config_from_postgres.rs
#   starts in a temporary directory of its own, as the postgres user;
# - systemd's tools (systemd-analyze, systemd-socket-activate), dpkg and
#   cargo-deb, with which tests/deploy_on_linux.rs checks the units, socket
#   activation and the Debian package.
# Idempotent and silent when everything is already in place.
set -eu

cd "$(dirname "$0")/.."
WEBSOCKETS='websockets>=13,<16'   # keep in step with tests/python_client_interoperates.rs
PUSHER='pusher>=3.3,<4'           # keep in step with tests/pusher_python.rs
target="${CARGO_TARGET_DIR:-target}"
venv="$target/pyenv"

updated=
apt_install() {
    if [ "$(id -u)" -eq 0 ]; then sudo=; else sudo=sudo; fi
    echo "test-deps: apt-get install $*" >&2
    if [ -z "$updated" ]; then
        $sudo apt-get update -qq
        updated=1
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv
command -v promtool >/dev/null 2>&1 || apt_install prometheus
command -v curl >/dev/null 2>&1 || apt_install curl
command -v openssl >/dev/null 2>&1 || apt_install openssl
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    apt_install redis-server
fi
if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then
    apt_install nats-server
fi
if ! command -v systemd-analyze >/dev/null 2>&1 || ! command -v systemd-socket-activate >/dev/null 2>&1; then
    apt_install systemd
fi
command -v dpkg-deb >/dev/null 2>&1 || apt_install dpkg
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    apt_install postgresql
fi
[ -x /usr/bin/chromium ] || apt_install chromium
CARGO_DEB=3.8.0
if ! cargo deb --version 2>/dev/null | grep -q "$CARGO_DEB"; then
    echo "test-deps: cargo install cargo-deb $CARGO_DEB" >&2
    cargo install --quiet --locked cargo-deb --version "$CARGO_DEB"
fi

mkdir -p "$target"
# The test takes the same lock, so the two never build the venv at once.
exec 9>"$target/pyenv.lock"
if command -v flock >/dev/null 2>&1; then flock 9; fi

if ! "$venv/bin/python" -c 'import websockets.asyncio.client, pusher' >/dev/null 2>&1; then
    if [ ! -x "$venv/bin/pip" ]; then
        rm -rf "$venv"
        if ! python3 -m venv "$venv" >/dev/null 2>&1; then
            # Debian splits venv/ensurepip into python3-venv.
            rm -rf "$venv"
            apt_install python3-venv
            python3 -m venv "$venv"
        fi
    fi
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$WEBSOCKETS" "$PUSHER"
    "$venv/bin/python" -c 'import websockets.asyncio.client, pusher'
fi
exec 9>&-

# Node.js and the npm packages of tests/js. `npm ci` installs exactly the
# lock file; a copy of the lock kept in node_modules says it already did.
if ! command -v node >/dev/null 2>&1; then
    apt_install nodejs npm
elif ! command -v npm >/dev/null 2>&1; then
    apt_install npm
fi
js=tests/js
stamp="$js/node_modules/.installed-package-lock.json"
if ! cmp -s "$js/package-lock.json" "$stamp" ||
    ! (cd "$js" && node -e 'require("pusher-js"); require("pusher"); require("puppeteer-core")') >/dev/null 2>&1; then
    echo "test-deps: npm ci in $js" >&2
    (cd "$js" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    (cd "$js" && node -e 'require("pusher-js"); require("pusher"); require("puppeteer-core")')
    cp "$js/package-lock.json" "$stamp"
fi
