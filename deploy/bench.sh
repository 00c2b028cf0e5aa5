#!/usr/bin/env bash
# THE benchmark command: installs what is missing (as deploy/test.sh does), builds in release
# mode, and runs every benchmark, each printing its figures next to the floor it measured in the
# same run (method and latest results: BENCHMARKS.md).
#
#   deploy/bench.sh          quick mode, for development (a few minutes)
#   deploy/bench.sh --full   full mode, for the numbers in BENCHMARKS.md (5,000-backend compiles
#                            at every compiler flag, about 10 minutes more)
#
# The benchmarks: render (vaas-vcl: one server's VCL of 5,000 backends, 1,000 routes), compiler
# (varnishd's cc_command: reload time and request throughput per flag set), reload (a synchronous
# write until varnishd serves it), incremental (one backend change in a cluster of 1,000 backends,
# 5,000 in full mode: split VCL against single VCL), writes (asynchronous write throughput on
# PostgreSQL and SQLite) and fanout (one scheduler reloading 1,000 servers, each with its own
# agent, against stand-in admin endpoints; 100 servers in quick mode). Extra arguments after the
# mode are benchmark names, to run only those.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

mode=quick
if [ "${1:-}" = "--full" ]; then
  mode=full
  shift
fi
benches=("$@")
if [ "${#benches[@]}" -eq 0 ]; then
  benches=(render compiler reload incremental writes fanout)
fi

deploy/install.sh
# shellcheck source=deploy/lib/path.sh
source deploy/lib/path.sh
vaas_path_setup

export VAAS_BENCH_MODE=$mode VAAS_TESTKIT_QUIET=1
if [ "$mode" = full ]; then
  export VAAS_BENCH_BACKENDS=${VAAS_BENCH_BACKENDS:-1,100,1000}
  export VAAS_BENCH_SERVERS=${VAAS_BENCH_SERVERS:-1,3,10}
fi
for bench in "${benches[@]}"; do
  printf '\n==> %s (%s mode)\n' "$bench" "$mode"
  case $bench in
    render) cargo bench -p vaas-vcl --bench render ;;
    compiler | reload | incremental | writes | fanout) cargo bench -p vaas-tests --bench "$bench" ;;
    *)
      echo "unknown benchmark $bench (render, compiler, reload, incremental, writes, fanout)" >&2
      exit 64
      ;;
  esac
done
