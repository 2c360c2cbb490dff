#!/bin/sh
# The whole test suite, from a fresh checkout: installs what the tests need
# (scripts/test-deps.sh), then runs every unit and end-to-end test and
# builds the docs. This is the README's test command; .ci/run calls it.
set -eu
cd "$(dirname "$0")/.."
sh scripts/test-deps.sh
cargo test --workspace --all-targets
cargo test --doc
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet
