#!/usr/bin/env bash
# THE test command: installs what is missing, then runs every check CI runs — the installer's own
# regression test (deploy/tests/install_test.sh), buf lint, rustfmt, clippy (warnings are errors),
# a build of the binaries, and the whole test suite with cargo-nextest (unit, in-process
# integration and end-to-end tests against real nats-server, PostgreSQL and varnishd processes).
# Every check runs even when an earlier one fails; the exit status is non-zero if any failed.
# Extra arguments go to `cargo nextest run` (for example a test name filter).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

deploy/install.sh
# What install.sh installed, found where it put it (it cannot change this script's PATH).
# shellcheck source=deploy/lib/path.sh
source deploy/lib/path.sh
vaas_path_setup

failed=()
check() {
  local name=$1
  shift
  printf '\n==> %s: %s\n' "$name" "$*"
  if "$@"; then
    printf '==> %s: ok\n' "$name"
  else
    printf '==> %s: FAILED\n' "$name"
    failed+=("$name")
  fi
}

# First: it is quick, and a broken installer is what a CI machine that has everything hides.
check "installer" deploy/tests/install_test.sh
check "buf lint" buf lint
check "rustfmt" cargo fmt --all --check
check "clippy" cargo clippy --workspace --all-targets -- -D warnings
# The end-to-end suites run these binaries; they do not build them themselves, and refuse ones
# older than their sources or Cargo.lock. A Cargo.lock change for other crates (a test's new
# dependency) relinks nothing, so once the build succeeded the binaries are marked as current.
build_binaries() {
  cargo build --workspace --bins && touch target/debug/vaas-api target/debug/vaas-scheduler target/debug/vaas-agent
}
check "build" build_binaries
check "tests" cargo nextest run --workspace "$@"

echo
if [ "${#failed[@]}" -gt 0 ]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "all checks passed"
