#!/usr/bin/env bash
# The grpcurl walk-through of the README, run against a running local VaaS (deploy/start.sh),
# with the admin token start.sh created: who the token is, the local varnishd that start.sh
# registered, a director routing "^/" and a backend pointing at the demo origin; then it fetches
# a page through varnishd and checks it comes from the origin. Finally an asynchronous change,
# followed with WatchTask.
#
#   deploy/demo.sh           run it (prints each command before running it)
#   deploy/demo.sh --print   only print the commands (with the ids of a fresh database)
#
# On a database where the walk-through already ran (director "demo" exists) it only checks the
# page. Uses the same port variables as deploy/start.sh.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
state=${VAAS_STATE_DIR:-$root/.vaas}
api=127.0.0.1:${VAAS_API_PORT:-50051}
varnish_http_port=${VAAS_VARNISH_HTTP_PORT:-16081}
origin_port=${VAAS_ORIGIN_PORT:-18080}
expected="hello from the VaaS demo origin"

print_only=false
[ "${1:-}" = --print ] && print_only=true

# Ids the commands refer to; a fresh database hands out 1 for each kind.
dc=1 cluster=1 server=1 director=1 backend=1 task=1

json_field() { # json_field EXPRESSION: evaluates a Python expression on the JSON document `r`.
  python3 -c 'import json, sys; r = json.load(sys.stdin); print(eval(sys.argv[1]))' "$1"
}

# call METHOD JSON [EXTRA GRPCURL FLAGS...]: prints the command, runs it (with the admin token)
# unless --print, keeps the response in $response.
call() {
  local method=$1 body=$2 extra="" arg
  shift 2
  for arg in "$@"; do
    if [[ "$arg" == *" "* ]]; then extra+=" '$arg'"; else extra+=" $arg"; fi
  done
  echo "grpcurl -plaintext -H \"authorization: Bearer \$TOKEN\"$extra -d '$body' $api vaas.v1.$method"
  $print_only && return 0
  response=$(grpcurl -plaintext -H "authorization: Bearer $TOKEN" "$@" -d "$body" "$api" "vaas.v1.$method") || {
    echo "error: vaas.v1.$method failed (see above); API log: $state/logs/api.log" >&2
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

echo "# 0. The admin token deploy/start.sh created (keep it like a password)."
echo "TOKEN=\$(cat .vaas/admin.token)"
if ! $print_only; then
  command -v grpcurl >/dev/null || { echo "error: grpcurl missing: run deploy/install.sh" >&2; exit 1; }
  [ -s "$state/admin.token" ] || { echo "error: no $state/admin.token: start VaaS with deploy/start.sh" >&2; exit 1; }
  TOKEN=$(<"$state/admin.token")
  grpcurl -plaintext "$api" list >/dev/null 2>&1 ||
    { echo "error: no VaaS API on $api: start it with deploy/start.sh" >&2; exit 1; }
fi
call TokenService/WhoAmI '{}'

echo "# 1. What deploy/start.sh registered: the local varnishd as an active server of cluster"
echo "#    \"demo\" in datacenter \"local\", with the VCL template \"default\" (<VCL/>), its agent"
echo "#    attached with a token bound to that server."
call ConfigService/ListVarnishServers '{}'
if ! $print_only; then
  server=$(json_field 'r["varnishServers"][0]["id"]' <<<"$response")
  dc=$(json_field 'r["varnishServers"][0]["dcId"]' <<<"$response")
  cluster=$(json_field 'r["varnishServers"][0]["clusterId"]' <<<"$response")
  directors=$(grpcurl -plaintext -H "authorization: Bearer $TOKEN" -d '{}' "$api" vaas.v1.ConfigService/ListDirectors |
    json_field '",".join(d["name"] for d in r.get("directors", []))')
  if [[ ",$directors," == *",demo,"* ]]; then
    echo "The walk-through already ran on this database (director \"demo\" exists): checking the page only."
    check_page
    exit 0
  fi
fi

echo "# 2. A director for every path, and the demo origin as its backend. Each write returns"
echo "#    once the cluster's varnishd runs the new VCL (synchronous by default)."
call ConfigService/CreateDirector "{\"director\":{\"name\":\"demo\",\"service\":\"demo\",\"clusterIds\":[$cluster],\"routeExpression\":\"^/\",\"router\":\"DIRECTOR_ROUTER_PATH\"}}"
$print_only || director=$(json_field 'r["director"]["id"]' <<<"$response")
call ConfigService/CreateBackend "{\"backend\":{\"directorId\":$director,\"dcId\":$dc,\"address\":\"127.0.0.1\",\"port\":$origin_port}}"
$print_only || backend=$(json_field 'r["backend"]["id"]' <<<"$response")

echo "# 3. The page, served by varnishd from the origin."
check_page

echo
echo "# 4. An asynchronous change: the answer comes at once with a PENDING task; WatchTask follows it."
call ConfigService/UpdateBackend "{\"backend\":{\"id\":$backend,\"weight\":2},\"updateMask\":{\"paths\":[\"weight\"]}}" -H 'prefer: respond-async'
if ! $print_only; then
  task=$(json_field 'r["tasks"][0]["id"]' <<<"$response")
else
  task='<task id from the answer>'
fi
echo "grpcurl -plaintext -H \"authorization: Bearer \$TOKEN\" -d '{\"id\":$task}' $api vaas.v1.TaskService/WatchTask"
if ! $print_only; then
  watched=$(grpcurl -plaintext -H "authorization: Bearer $TOKEN" -max-time 120 -d "{\"id\":$task}" "$api" vaas.v1.TaskService/WatchTask)
  printf '%s\n' "$watched"
  if [[ "$watched" != *TASK_STATE_SUCCESS* ]]; then
    echo "error: task $task did not end in TASK_STATE_SUCCESS" >&2
    exit 1
  fi
  echo "ok: the asynchronous change was applied (server $server runs it)"
fi
