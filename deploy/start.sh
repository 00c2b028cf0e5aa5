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
database_url=${VAAS_DATABASE_URL:-sqlite://$state/vaas.db?mode=rwc}
secret_file=$state/varnish-secret

# Stop order is the reverse of start order.
all_services=(nats varnishd origin scheduler agent api)

export PATH="$HOME/.cargo/bin:/usr/local/bin:/usr/sbin:/sbin:$PATH"

say() { printf '%s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# --- processes ---------------------------------------------------------------------------------

pid_of() { # Prints the pid of a service started by us if it is alive.
  local pid_file=$run_dir/$1.pid pid
  [ -f "$pid_file" ] || return 1
  pid=$(cat "$pid_file")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  # Guards against a recycled pid: the process must still run from our binary.
  grep -qF -- "$(cat "$run_dir/$1.cmd" 2>/dev/null)" "/proc/$pid/cmdline" 2>/dev/null || return 1
  echo "$pid"
}

launch() { # launch NAME COMMAND...: starts COMMAND in its own session, output to logs/NAME.log.
  local name=$1
  shift
  mkdir -p "$run_dir" "$log_dir"
  printf '\n=== %s: starting at %s\n' "$name" "$(date -Is)" >>"$log_dir/$name.log"
  # Without job control a background child is not a group leader, so setsid does not fork and $!
  # is the service's own pid (which is also its process group id).
  setsid "$@" </dev/null >>"$log_dir/$name.log" 2>&1 &
  echo $! >"$run_dir/$name.pid"
  basename "$1" >"$run_dir/$name.cmd"
}

stop_service() {
  local name=$1 pid waited=0
  if ! pid=$(pid_of "$name"); then
    rm -f "$run_dir/$name.pid" "$run_dir/$name.cmd"
    return 0
  fi
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt 100 ]; do
    sleep 0.1 # polling for exit, up to 10 s
    waited=$((waited + 1))
  done
  if kill -0 "$pid" 2>/dev/null; then
    say "$name (pid $pid) did not stop within 10 s: killing it"
    kill -KILL -- "-$pid" 2>/dev/null || true
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

wait_ready() { # wait_ready NAME DESCRIPTION CHECK...: polls CHECK until it succeeds or the deadline.
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
  launch nats nats-server -js -a 127.0.0.1 -p "$nats_port" -m "$nats_monitor_port" -sd "$state/jetstream"
  wait_ready nats "JetStream healthy on $nats_url" nats_healthy
}

start_varnishd() {
  require_free_port "$varnish_http_port" VAAS_VARNISH_HTTP_PORT
  require_free_port "$varnish_admin_port" VAAS_VARNISH_ADMIN_PORT
  if [ ! -s "$secret_file" ]; then
    (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$secret_file" && echo >>"$secret_file")
  fi
  # As root varnishd drops to the varnish user, which must be able to read the secret.
  if getent group varnish >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
    chgrp varnish "$secret_file" && chmod 0640 "$secret_file"
  fi
  # -f '': only the manager starts; the agent loads the VCL and starts the cache child.
  launch varnishd varnishd -F -n "$state/varnish" \
    -a "127.0.0.1:$varnish_http_port" -T "127.0.0.1:$varnish_admin_port" -S "$secret_file" \
    -f ''
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
    --listen "127.0.0.1:$scheduler_port" --database-url "$database_url" --nats-url "$nats_url"
  wait_ready scheduler "gRPC health SERVING on 127.0.0.1:$scheduler_port" grpc_serving "$scheduler_port"
}

start_agent() {
  launch agent "$bin_dir/vaas-agent" \
    --scheduler-url "http://127.0.0.1:$scheduler_port" \
    --varnish-admin "127.0.0.1:$varnish_admin_port" --varnish-secret-file "$secret_file" \
    --server-address 127.0.0.1 --server-admin-port "$varnish_admin_port" \
    --state-dir "$state/agent-state"
  # The agent has no listener of its own: it is ready when it runs (it keeps retrying to reach
  # the scheduler). A bad flag makes it exit at once, which start_api's checks would not see.
  pid_of agent >/dev/null || { tail -n 30 "$log_dir/agent.log" >&2; die "vaas-agent exited at start"; }
  say "started agent (for varnishd 127.0.0.1:$varnish_admin_port)"
}

start_api() {
  require_free_port "$api_port" VAAS_API_PORT
  launch api "$bin_dir/vaas-api" \
    --listen "127.0.0.1:$api_port" --database-url "$database_url" --nats-url "$nats_url"
  wait_ready api "gRPC health SERVING on 127.0.0.1:$api_port" grpc_serving "$api_port"
  pid_of agent >/dev/null || { tail -n 30 "$log_dir/agent.log" >&2; die "vaas-agent exited"; }
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
  nats-server     $nats_url  (monitor http://127.0.0.1:$nats_monitor_port/)
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
    stop_all
    mkdir -p "$state" "$log_dir" "$run_dir"
    start_nats
    start_varnishd
    start_origin
    say
    say "nats $nats_url, varnishd http://127.0.0.1:$varnish_http_port/ (admin 127.0.0.1:$varnish_admin_port, secret $secret_file), origin http://127.0.0.1:$origin_port/"
    ;;
  start)
    "$root/deploy/install.sh"
    build
    stop_all
    mkdir -p "$state" "$log_dir" "$run_dir"
    start_nats
    start_varnishd
    start_origin
    start_scheduler
    start_agent
    start_api
    print_endpoints
    ;;
  *)
    die "unknown command $command (use: start, infra, stop, status)"
    ;;
esac
