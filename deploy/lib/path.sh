# shellcheck shell=bash
# Sourced, not run: `source deploy/lib/path.sh && vaas_path_setup`.
#
# Puts on PATH the directories into which deploy/install.sh's installers put programs, so that
# install.sh itself and its callers (start.sh, test.sh) find what it just installed: install.sh
# runs as a child process and cannot change its caller's PATH, so both compute the same
# directories here.
#
# The directories come from the tools actually in use — the scripts directory of the `python3`
# first on PATH (a virtualenv's bin/, a pyenv version's bin/, /usr/local/bin for Debian's python),
# pip's --user directory, npm's global prefix, cargo's bin — never from a fixed list such as
# /usr/local/bin: with a fixed list a nats-server outside the python3 in use would be found, and
# deploy/tests/install_test.sh could not hide the installed tools from a run of install.sh.

# vaas_path_add DIR: appends DIR to PATH when it exists and is not on PATH yet. Appended, so the
# user's own order is kept: a pyenv shim or a virtualenv stays first, and `python3` stays the
# one the user chose.
vaas_path_add() {
  [ -n "$1" ] && [ -d "$1" ] || return 0
  case ":$PATH:" in
    *":$1:"*) ;;
    *) PATH="${PATH:+$PATH:}$1" ;;
  esac
}

vaas_path_setup() {
  local dir
  vaas_path_add "${CARGO_HOME:-$HOME/.cargo}/bin"
  if command -v python3 >/dev/null 2>&1; then
    # Where `pip install` puts console scripts (nats-server, grpcurl) for this interpreter.
    dir=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null) || dir=
    vaas_path_add "$dir"
    # Where `pip install --user` puts them (a non-root user of Debian's python).
    dir=$(python3 -m site --user-base 2>/dev/null) || dir=
    [ -z "$dir" ] || vaas_path_add "$dir/bin"
  fi
  # `npm install -g` puts buf in $(npm prefix -g)/bin. Asking npm costs a node start-up, so
  # only when buf is not found anyway.
  if ! command -v buf >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
    dir=$(npm prefix -g 2>/dev/null) || dir=
    [ -z "$dir" ] || vaas_path_add "$dir/bin"
  fi
  # varnishd and varnishadm live in /usr/sbin, which a non-root shell may not have on PATH.
  vaas_path_add /usr/sbin
  vaas_path_add /sbin
  export PATH
  hash -r
}
