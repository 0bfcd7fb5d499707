#!/bin/sh
# Builds the fake apiserver and cross-checks it with the official Python client.
# Needs: pip install kubernetes
set -eu
root=$(cd "$(dirname "$0")/../../.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
cargo build --manifest-path "$root/Cargo.toml" -p lb-fake-apiserver --bin fake-apiserver
exec timeout 60 python3 "$root/tests/fake-apiserver/crosscheck/crosscheck.py" "$target/debug/fake-apiserver"
