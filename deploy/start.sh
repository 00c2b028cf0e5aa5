#!/usr/bin/env bash
# THE run command: a complete local VaaS on one machine.
#
#   deploy/start.sh          install what is missing, build, (re)start everything, print endpoints
#   deploy/start.sh infra    the same for nats-server, varnishd and the demo origin only (no build),
#                            for running the VaaS services from cargo yourself
#   deploy/start.sh stop     stop everything a previous run started
#   deploy/start.sh status   show what is running
#
# Everything lives under .vaas/ in the repository (gitignored): pid files in .vaas/run/, logs in
# .vaas/logs/, the SQLite database .vaas/vaas.db, the JetStream store, varnishd's -n directory and
# admin secret, the demo origin's files. Processes run in the background in their own sessions;
# the script waits for each one to be ready (with a deadline, never a blind sleep) and exits 0.
#
# Running it again restarts: it first stops whatever a previous run started (found by the pid
# files), then starts everything again. Data in .vaas/ is kept; `rm -rf .vaas` starts afresh.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

state=${VAAS_STATE_DIR:-$root/.vaas}
run_dir=$state/run
log_dir=$state/logs

nats_port=${VAAS_NATS_PORT:-14222}
nats_monitor_port=${VAAS_NATS_MONITOR_PORT:-18222}
api_port=${VAAS_API_PORT:-50051}
scheduler_port=${VAAS_SCHEDULER_PORT:-50052}
varnish_http_port=${VAAS_VARNISH_HTTP_PORT:-16081}
varnish_admin_port=${VAAS_VARNISH_ADMIN_PORT:-16082}
origin_port=${VAAS_ORIGIN_PORT:-18080}
deadline_seconds=${VAAS_START_TIMEOUT:-30}

nats_url=nats://127.0.0.1:$nats_port
# vaas-api and vaas-scheduler log in to NATS as this user; nobody else may connect.
nats_user=vaas
nats_password_file=$state/nats-password
database_url=${VAAS_DATABASE_URL:-sqlite://$state/vaas.db?mode=rwc}
secret_file=$state/varnish-secret
admin_token_file=$state/admin.token
agent_token_file=$state/agent.token

# Stop order is the reverse of start order.
all_services=(nats varnishd origin scheduler api agent)

# The directories install.sh installs into (pip's, npm's, cargo's), found the way it finds them;
# again after install.sh ran, which may have made new ones.
# shellcheck source=deploy/lib/path.sh
source "$root/deploy/lib/path.sh"
vaas_path_setup

say() { printf '%s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# --- processes ---------------------------------------------------------------------------------
# A service is known by the pid that launch() recorded and that process's start time (field 22 of
# /proc/PID/stat). Both are fixed from the fork on, unlike the command line, which is still the
# script's own bash until the child has exec'd, and is a wrapper's (a pyenv shim, a Python console
# script) rather than the program's when a wrapper runs it. So checking them cannot race with
# start-up, and works whatever runs in between. The start time tells our process from a later
# one that got the same pid.
#
# Each service runs in its own session and process group, whose id is that pid: a wrapper that
# spawns the real program as a child (rather than exec'ing it) leaves it in that group, so the
# service counts as running while any member of the group runs, and stopping signals the group.

proc_stat() { # proc_stat PID: sets stat_fields to fields 3... of /proc/PID/stat (fails if gone).
  local stat
  { read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 1
  # Field 2, the command name in parentheses, may hold spaces and parentheses itself.
  read -ra stat_fields <<<"${stat##*) }"
  # stat_fields[0] is field 3 (state), [2] field 5 (process group), [19] field 22 (start time).
}

start_time() { # start_time PID: prints the start time of PID, if it runs (a zombie does not).
  proc_stat "$1" && [ "${stat_fields[0]}" != Z ] && echo "${stat_fields[19]}"
}

group_runs() { # group_runs PGID: true while a process of group PGID runs (zombies do not count).
  local stat_file
  kill -0 -- "-$1" 2>/dev/null || return 1 # the common answer, without reading /proc
  for stat_file in /proc/[0-9]*/stat; do
    proc_stat "${stat_file:6:-5}" || continue
    [ "${stat_fields[2]}" = "$1" ] && [ "${stat_fields[0]}" != Z ] && return 0
  done
  return 1
}

pid_of() { # pid_of NAME: prints the pid (= process group id) of service NAME while it runs.
  local pid_file=$run_dir/$1.pid pid="" started="" now
  [ -f "$pid_file" ] || return 1
  read -r pid started <"$pid_file" || true
  [ -n "$pid" ] || return 1
  if [ -z "$started" ] && [ -f "$run_dir/$1.cmd" ]; then
    # Started by an older start.sh, which recorded the program's name instead of a start time.
    kill -0 "$pid" 2>/dev/null && grep -qF -- "$(cat "$run_dir/$1.cmd")" "/proc/$pid/cmdline" 2>/dev/null &&
      echo "$pid"
    return
  fi
  if now=$(start_time "$pid"); then
    # A live process has this pid: ours if it started when ours did, else the pid was reused.
    [ "$now" = "$started" ] && echo "$pid"
    return
  fi
  # The leader is gone (or a zombie). Processes left in its group are ours: a process group id
  # cannot be handed to a new process while the group has members.
  group_runs "$pid" && echo "$pid"
}

launch() { # launch NAME COMMAND...: starts COMMAND in its own session, output to logs/NAME.log.
  local name=$1 pid
  shift
  mkdir -p "$run_dir" "$log_dir"
  printf '\n=== %s: starting at %s\n' "$name" "$(date -Is)" >>"$log_dir/$name.log"
  # Without job control a background child is not a group leader, so setsid does not fork and $!
  # is the service's own pid, which becomes its session and process group id.
  setsid "$@" </dev/null >>"$log_dir/$name.log" 2>&1 &
  pid=$!
  # The forked child exists now, so its start time can be read at once; if it already ended, an
  # empty start time makes pid_of look only for a group, which cannot exist then.
  printf '%s %s\n' "$pid" "$(start_time "$pid" || true)" >"$run_dir/$name.pid"
  rm -f "$run_dir/$name.cmd"
}

stop_service() {
  local name=$1 pid waited=0
  if ! pid=$(pid_of "$name"); then
    rm -f "$run_dir/$name.pid" "$run_dir/$name.cmd"
    return 0
  fi
  # The whole group; just the leader if it has not made its own group yet.
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  while pid_of "$name" >/dev/null && [ "$waited" -lt 100 ]; do
    sleep 0.1 # polling for exit, up to 10 s
    waited=$((waited + 1))
  done
  if pid_of "$name" >/dev/null; then
    say "$name (pid $pid) did not stop within 10 s: killing it"
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    waited=0
    while pid_of "$name" >/dev/null && [ "$waited" -lt 50 ]; do
      sleep 0.1 # SIGKILL takes effect at once; polling for the processes to be gone, up to 5 s
      waited=$((waited + 1))
    done
  fi
  rm -f "$run_dir/$name.pid" "$run_dir/$name.cmd"
  say "stopped $name (pid $pid)"
}

stop_all() {
  local index
  for ((index = ${#all_services[@]} - 1; index >= 0; index--)); do
    stop_service "${all_services[index]}"
  done
}

# wait_ready NAME DESCRIPTION CHECK...: polls CHECK until it succeeds, the service has exited (no
# process of its group runs any more) or the deadline passed. Only the CHECK decides readiness.
wait_ready() {
  local name=$1 description=$2
  shift 2
  local deadline=$((SECONDS + deadline_seconds))
  until "$@" >/dev/null 2>&1; do
    if ! pid_of "$name" >/dev/null; then
      say "error: $name exited before it was ready ($description). Last lines of $log_dir/$name.log:" >&2
      tail -n 30 "$log_dir/$name.log" >&2
      exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      say "error: $name not ready ($description) within ${deadline_seconds}s. Last lines of $log_dir/$name.log:" >&2
      tail -n 30 "$log_dir/$name.log" >&2
      exit 1
    fi
    sleep 0.2 # polling interval
  done
  say "ready   $name ($description)"
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

require_free_port() { # require_free_port PORT VARIABLE
  if port_in_use "$1"; then
    die "port $1 is already in use by another program; free it or choose another with $2=..."
  fi
}

# --- readiness checks --------------------------------------------------------------------------

nats_healthy() { curl -fsS --max-time 2 "http://127.0.0.1:$nats_monitor_port/healthz?js-enabled=true"; }
varnish_admin_ready() {
  timeout 5 varnishadm -T "127.0.0.1:$varnish_admin_port" -S "$secret_file" status
}
origin_ready() { curl -fsS --max-time 2 "http://127.0.0.1:$origin_port/"; }
grpc_serving() {
  timeout 5 grpcurl -plaintext "127.0.0.1:$1" grpc.health.v1.Health/Check | grep -q SERVING
}

# --- the parts ---------------------------------------------------------------------------------

start_nats() {
  require_free_port "$nats_port" VAAS_NATS_PORT
  require_free_port "$nats_monitor_port" VAAS_NATS_MONITOR_PORT
  mkdir -p "$state/jetstream"
  if [ ! -s "$nats_password_file" ]; then
    (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$nats_password_file" && echo >>"$nats_password_file")
  fi
  local password
  password=$(<"$nats_password_file")
  # Rewritten on every start so that it always matches the password file; it holds the password
  # too, so owner-only. The monitoring port (readiness) needs no login.
  (umask 077 && cat >"$state/nats.conf" <<EOF
authorization {
  user: $nats_user
  password: "$password"
}
EOF
  )
  launch nats nats-server -c "$state/nats.conf" -js -a 127.0.0.1 -p "$nats_port" -m "$nats_monitor_port" -sd "$state/jetstream"
  wait_ready nats "JetStream healthy on $nats_url" nats_healthy
}

start_varnishd() {
  require_free_port "$varnish_http_port" VAAS_VARNISH_HTTP_PORT
  require_free_port "$varnish_admin_port" VAAS_VARNISH_ADMIN_PORT
  if [ ! -s "$secret_file" ]; then
    (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$secret_file" && echo >>"$secret_file")
  fi
  # As root, varnishd's manager drops to the varnish user, which must read the secret; the cache
  # child (vcache) shares the varnish group, so the group must not: owner-only, never group.
  if getent passwd varnish >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
    chown varnish "$secret_file" && chmod 0600 "$secret_file"
  fi
  # The hardening and compiler parameters every VaaS varnishd runs with (one flag and value a
  # line; the test kit reads the same file).
  local params=() flag value
  while read -r flag value; do
    case $flag in '' | '#'*) continue ;; esac
    params+=("$flag" "$value")
  done <"$root/deploy/varnishd.params"
  # -f '': only the manager starts; the agent loads the VCL and starts the cache child.
  launch varnishd varnishd -F -n "$state/varnish" \
    -a "127.0.0.1:$varnish_http_port" -T "127.0.0.1:$varnish_admin_port" -S "$secret_file" \
    "${params[@]}" -f ''
  wait_ready varnishd "admin port 127.0.0.1:$varnish_admin_port answers" varnish_admin_ready
}

start_origin() {
  require_free_port "$origin_port" VAAS_ORIGIN_PORT
  mkdir -p "$state/origin"
  cat >"$state/origin/index.html" <<'HTML'
<!doctype html>
<title>VaaS demo origin</title>
<p>hello from the VaaS demo origin</p>
HTML
  launch origin python3 -m http.server "$origin_port" --bind 127.0.0.1 --directory "$state/origin"
  wait_ready origin "http://127.0.0.1:$origin_port/ answers" origin_ready
}

target_dir() {
  cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])'
}

build() {
  say "building vaas-api, vaas-scheduler and vaas-agent (release) ..."
  if ! cargo build --release -p vaas-api -p vaas-scheduler -p vaas-agent; then
    cat >&2 <<EOF

error: building the VaaS binaries failed (the compiler's messages are above), so nothing was
started. To run only nats-server, varnishd and the demo origin, use: deploy/start.sh infra
EOF
    exit 1
  fi
  bin_dir=$(target_dir)/release
}

start_scheduler() {
  require_free_port "$scheduler_port" VAAS_SCHEDULER_PORT
  launch scheduler "$bin_dir/vaas-scheduler" \
    --listen "127.0.0.1:$scheduler_port" --database-url "$database_url" --nats-url "$nats_url" \
    --nats-user "$nats_user" --nats-password-file "$nats_password_file"
  wait_ready scheduler "gRPC health SERVING on 127.0.0.1:$scheduler_port" grpc_serving "$scheduler_port"
}

start_api() {
  require_free_port "$api_port" VAAS_API_PORT
  launch api "$bin_dir/vaas-api" \
    --listen "127.0.0.1:$api_port" --database-url "$database_url" --nats-url "$nats_url" \
    --nats-user "$nats_user" --nats-password-file "$nats_password_file"
  wait_ready api "gRPC health SERVING on 127.0.0.1:$api_port" grpc_serving "$api_port"
}

# --- credentials and the local server ----------------------------------------------------------

api_call() { # api_call METHOD JSON [GRPCURL FLAGS...]: calls the API with the local admin token.
  local method=$1 body=$2
  shift 2
  grpcurl -plaintext -max-time 120 -H "authorization: Bearer $(<"$admin_token_file")" "$@" \
    -d "$body" "127.0.0.1:$api_port" "vaas.v1.$method"
}

json_field() { # json_field EXPRESSION: evaluates a Python expression on the JSON document `r`.
  python3 -c 'import json, sys; r = json.load(sys.stdin); print(eval(sys.argv[1]))' "$1"
}

# The first admin token is made directly in the store (no token exists yet to ask the API with);
# a token that still works is kept, so running this again changes nothing.
ensure_admin_token() {
  if [ -s "$admin_token_file" ] && api_call TokenService/WhoAmI '{}' >/dev/null 2>&1; then
    say "ready   admin token in $admin_token_file"
    return
  fi
  if ! (umask 077 && "$bin_dir/vaas-api" create-token --database-url "$database_url" \
    --name "local-admin-$(date +%Y%m%d-%H%M%S)" --role admin --ttl 366d >"$admin_token_file.new"); then
    die "cannot create the admin token (vaas-api create-token failed; its message is above)"
  fi
  mv "$admin_token_file.new" "$admin_token_file"
  say "created admin token in $admin_token_file"
}

# find_or_create LIST_METHOD COLLECTION FIELD VALUE CREATE_METHOD KEY BODY [GRPCURL FLAGS...]:
# prints the id of the item of COLLECTION whose FIELD is VALUE, creating it with BODY if missing.
find_or_create() {
  local listed id
  listed=$(api_call "ConfigService/$1" '{"pageSize":1000}') || die "vaas.v1.ConfigService/$1 failed"
  id=$(json_field "next((x['id'] for x in r.get('$2', []) if str(x.get('$3')) == '$4'), '')" <<<"$listed")
  if [ -z "$id" ]; then
    id=$(api_call "ConfigService/$5" "$7" "${@:8}" | json_field "r['$6']['id']") ||
      die "vaas.v1.ConfigService/$5 failed"
  fi
  echo "$id"
}

# The local varnishd is registered as a server of cluster "demo" (in maintenance until its agent
# is there), its agent gets a fresh token bound to that server (the previous one is revoked), and
# start_agent then activates the server.
register_local_server() {
  local dc cluster template previous
  dc=$(find_or_create ListDcs dcs symbol local CreateDc dc '{"dc":{"name":"Local","symbol":"local"}}')
  cluster=$(find_or_create ListClusters clusters name demo CreateCluster cluster '{"cluster":{"name":"demo"}}')
  template=$(find_or_create ListVclTemplates vclTemplates name default CreateVclTemplate vclTemplate \
    '{"vclTemplate":{"name":"default","content":"<VCL/>"}}')
  local_server=$(find_or_create ListVarnishServers varnishServers adminPort "$varnish_admin_port" \
    CreateVarnishServer varnishServer \
    "{\"varnishServer\":{\"address\":\"127.0.0.1\",\"hostname\":\"localhost\",\"httpPort\":$varnish_http_port,\"adminPort\":$varnish_admin_port,\"status\":\"SERVER_STATUS_MAINTENANCE\",\"dcId\":$dc,\"clusterId\":$cluster,\"templateId\":$template}}" \
    -H 'prefer: respond-async')
  if [ -s "$agent_token_file.id" ]; then
    previous=$(<"$agent_token_file.id")
    api_call TokenService/RevokeToken "{\"id\":$previous}" >/dev/null 2>&1 || true
  fi
  local created
  created=$(api_call TokenService/CreateToken \
    "{\"name\":\"local-agent-$local_server-$(date +%Y%m%d-%H%M%S)\",\"role\":\"ROLE_AGENT\",\"varnishServerId\":$local_server,\"ttl\":\"31622400s\"}") ||
    die "cannot create the agent's token"
  (umask 077 && json_field 'r["secret"]' <<<"$created" >"$agent_token_file" &&
    json_field 'r["token"]["id"]' <<<"$created" >"$agent_token_file.id")
  say "ready   server $local_server (127.0.0.1 admin port $varnish_admin_port), agent token in $agent_token_file"
}

start_agent() {
  launch agent "$bin_dir/vaas-agent" \
    --scheduler-url "http://127.0.0.1:$scheduler_port" \
    --varnish-admin "127.0.0.1:$varnish_admin_port" --varnish-secret-file "$secret_file" \
    --server-address 127.0.0.1 --server-admin-port "$varnish_admin_port" \
    --token-file "$agent_token_file" --state-dir "$state/agent-state"
  # The agent has no listener to check: activating its server is the check, since that write
  # answers only once the agent attached and loaded the cluster's VCL.
  if ! api_call ConfigService/UpdateVarnishServer \
    "{\"varnishServer\":{\"id\":$local_server,\"status\":\"SERVER_STATUS_ACTIVE\"},\"updateMask\":{\"paths\":[\"status\"]}}" \
    >/dev/null; then
    say "error: server $local_server did not become active with its agent. Last lines of $log_dir/agent.log:" >&2
    tail -n 30 "$log_dir/agent.log" >&2
    exit 1
  fi
  say "ready   agent (server $local_server is active and runs its VCL)"
}

status() {
  local name pid
  for name in "${all_services[@]}"; do
    if pid=$(pid_of "$name"); then say "running $name (pid $pid)"; else say "stopped $name"; fi
  done
}

print_endpoints() {
  cat <<EOF

VaaS is running (state and logs in $state):
  vaas-api        127.0.0.1:$api_port (gRPC, reflection on)  log: $log_dir/api.log
  vaas-scheduler  127.0.0.1:$scheduler_port (gRPC)           log: $log_dir/scheduler.log
  vaas-agent      for varnishd admin 127.0.0.1:$varnish_admin_port   log: $log_dir/agent.log
  varnishd        http://127.0.0.1:$varnish_http_port/  admin 127.0.0.1:$varnish_admin_port  secret $secret_file
  nats-server     $nats_url  user $nats_user, password in $nats_password_file  (monitor http://127.0.0.1:$nats_monitor_port/)
  demo origin     http://127.0.0.1:$origin_port/
  database        $database_url

Try it: deploy/demo.sh runs this walk-through for you (ids below are those of a fresh database):

EOF
  "$root/deploy/demo.sh" --print
  say
  say "Stop everything with: deploy/start.sh stop"
}

# --- main --------------------------------------------------------------------------------------

command=${1:-start}
case $command in
  stop)
    stop_all
    ;;
  status)
    status
    ;;
  infra)
    "$root/deploy/install.sh"
    vaas_path_setup
    stop_all
    mkdir -p "$state" "$log_dir" "$run_dir"
    start_nats
    start_varnishd
    start_origin
    say
    say "nats $nats_url (user $nats_user, password in $nats_password_file), varnishd http://127.0.0.1:$varnish_http_port/ (admin 127.0.0.1:$varnish_admin_port, secret $secret_file), origin http://127.0.0.1:$origin_port/"
    ;;
  start)
    "$root/deploy/install.sh"
    vaas_path_setup
    build
    stop_all
    mkdir -p "$state" "$log_dir" "$run_dir"
    start_nats
    start_varnishd
    start_origin
    start_scheduler
    start_api
    ensure_admin_token
    register_local_server
    start_agent
    print_endpoints
    ;;
  *)
    die "unknown command $command (use: start, infra, stop, status)"
    ;;
esac
