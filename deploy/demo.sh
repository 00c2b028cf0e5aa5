#!/usr/bin/env bash
# The grpcurl walk-through of the README, run against a running local VaaS (deploy/start.sh):
# a datacenter, a cluster, a VCL template, the local varnishd as a Varnish server, a director
# routing "^/" and a backend pointing at the demo origin; then it fetches a page through varnishd
# and checks it comes from the origin. Finally an asynchronous change, followed with WatchTask.
#
#   deploy/demo.sh           run it (prints each command before running it)
#   deploy/demo.sh --print   only print the commands (with the ids of a fresh database)
#
# On a database where the walk-through already ran (datacenter "local" exists) it only checks the
# page. Uses the same port variables as deploy/start.sh.
set -euo pipefail

api=127.0.0.1:${VAAS_API_PORT:-50051}
varnish_http_port=${VAAS_VARNISH_HTTP_PORT:-16081}
varnish_admin_port=${VAAS_VARNISH_ADMIN_PORT:-16082}
origin_port=${VAAS_ORIGIN_PORT:-18080}
expected="hello from the VaaS demo origin"

print_only=false
[ "${1:-}" = --print ] && print_only=true

# Ids the commands refer to; a fresh database hands out 1 for each kind.
dc=1 cluster=1 template=1 server=1 director=1 backend=1 task=1

json_field() { # json_field EXPRESSION: evaluates a Python expression on the JSON document `r`.
  python3 -c 'import json, sys; r = json.load(sys.stdin); print(eval(sys.argv[1]))' "$1"
}

# call METHOD JSON [EXTRA GRPCURL FLAGS...]: prints the command, runs it unless --print, keeps
# the response in $response.
call() {
  local method=$1 body=$2 extra="" arg
  shift 2
  for arg in "$@"; do
    if [[ "$arg" == *" "* ]]; then extra+=" '$arg'"; else extra+=" $arg"; fi
  done
  echo "grpcurl -plaintext$extra -d '$body' $api vaas.v1.$method"
  $print_only && return 0
  response=$(grpcurl -plaintext "$@" -d "$body" "$api" "vaas.v1.$method") || {
    echo "error: vaas.v1.$method failed (see above); API log: .vaas/logs/api.log" >&2
    exit 1
  }
  printf '%s\n\n' "$response"
}

check_page() {
  echo "curl -s http://127.0.0.1:$varnish_http_port/"
  $print_only && return 0
  local page
  page=$(curl -s --max-time 10 "http://127.0.0.1:$varnish_http_port/") || true
  printf '%s\n' "$page"
  if [[ "$page" != *"$expected"* ]]; then
    echo "error: varnishd did not serve the origin's page (expected \"$expected\")" >&2
    exit 1
  fi
  echo "ok: varnishd serves the demo origin through VaaS"
}

if ! $print_only; then
  command -v grpcurl >/dev/null || { echo "error: grpcurl missing: run deploy/install.sh" >&2; exit 1; }
  grpcurl -plaintext "$api" list >/dev/null 2>&1 ||
    { echo "error: no VaaS API on $api: start it with deploy/start.sh" >&2; exit 1; }
  existing=$(grpcurl -plaintext -d '{}' "$api" vaas.v1.ConfigService/ListDcs |
    json_field '",".join(d["symbol"] for d in r.get("dcs", []))')
  if [[ ",$existing," == *",local,"* ]]; then
    echo "The walk-through already ran on this database (datacenter \"local\" exists): checking the page only."
    check_page
    exit 0
  fi
fi

echo "# 1. A datacenter, a cluster and a VCL template (<VCL/> expands to the generated VCL)."
call ConfigService/CreateDc '{"dc":{"name":"Local","symbol":"local"}}'
$print_only || dc=$(json_field 'r["dc"]["id"]' <<<"$response")
call ConfigService/CreateCluster '{"cluster":{"name":"demo"}}'
$print_only || cluster=$(json_field 'r["cluster"]["id"]' <<<"$response")
call ConfigService/CreateVclTemplate '{"vclTemplate":{"name":"default","content":"<VCL/>"}}'
$print_only || template=$(json_field 'r["vclTemplate"]["id"]' <<<"$response")

echo "# 2. The local varnishd, managed by the vaas-agent beside it."
call ConfigService/CreateVarnishServer "{\"varnishServer\":{\"address\":\"127.0.0.1\",\"hostname\":\"localhost\",\"httpPort\":$varnish_http_port,\"adminPort\":$varnish_admin_port,\"status\":\"SERVER_STATUS_ACTIVE\",\"dcId\":$dc,\"clusterId\":$cluster,\"templateId\":$template}}"
$print_only || server=$(json_field 'r["varnishServer"]["id"]' <<<"$response")

echo "# 3. A director for every path, and the demo origin as its backend. Each write returns"
echo "#    once the cluster's varnishd runs the new VCL (synchronous by default)."
call ConfigService/CreateDirector "{\"director\":{\"name\":\"demo\",\"service\":\"demo\",\"clusterIds\":[$cluster],\"routeExpression\":\"^/\",\"router\":\"DIRECTOR_ROUTER_PATH\"}}"
$print_only || director=$(json_field 'r["director"]["id"]' <<<"$response")
call ConfigService/CreateBackend "{\"backend\":{\"directorId\":$director,\"dcId\":$dc,\"address\":\"127.0.0.1\",\"port\":$origin_port}}"
$print_only || backend=$(json_field 'r["backend"]["id"]' <<<"$response")

echo "# 4. The page, served by varnishd from the origin."
check_page

echo
echo "# 5. An asynchronous change: the answer comes at once with a PENDING task; WatchTask follows it."
call ConfigService/UpdateBackend "{\"backend\":{\"id\":$backend,\"directorId\":$director,\"dcId\":$dc,\"address\":\"127.0.0.1\",\"port\":$origin_port,\"weight\":2}}" -H 'prefer: respond-async'
if ! $print_only; then
  task=$(json_field 'r["tasks"][0]["id"]' <<<"$response")
else
  task='<task id from the answer>'
fi
echo "grpcurl -plaintext -d '{\"id\":$task}' $api vaas.v1.TaskService/WatchTask"
if ! $print_only; then
  watched=$(grpcurl -plaintext -max-time 120 -d "{\"id\":$task}" "$api" vaas.v1.TaskService/WatchTask)
  printf '%s\n' "$watched"
  if [[ "$watched" != *TASK_STATE_SUCCESS* ]]; then
    echo "error: task $task did not end in TASK_STATE_SUCCESS" >&2
    exit 1
  fi
  echo "ok: the asynchronous change was applied (server $server runs it)"
fi
