//! Fan-out benchmark: one scheduler driving a reload on a cluster of many servers, each with its
//! own real vaas-agent process, against stand-in admin endpoints that answer every command at
//! once (so that varnishd's compiler, measured by the other benchmarks, is out of the figure).
//!
//! Measures a synchronous write until it is active on every server, the scheduler's reload
//! itself (its start until its tasks finished: snapshot, prepare on every agent, commit on every
//! agent), and the resident memory of the scheduler and of the agents. The floor, measured in
//! the same run, is the same VCL text sent with `vcl.inline` + `vcl.use` straight to as many
//! stand-in endpoints at once over connections already open. Run: `cargo bench -p vaas-tests
//! --bench fanout` (`VAAS_BENCH_AGENTS`, default 100, 1000 with `VAAS_BENCH_MODE=full`;
//! `VAAS_BENCH_ROUNDS`, default 5).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use futures::{StreamExt, TryStreamExt};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use vaas_agent::varnish_cli::{CliTimeouts, VarnishCli, auth_response};
use vaas_proto::v1::{
    Backend, CreateBackendRequest, CreateDirectorRequest, CreateVarnishServerRequest, Director,
    ListVarnishServersRequest, ServerStatus, SyncState, TaskState, UpdateVarnishServerRequest,
    VarnishServer,
};
use vaas_testkit::ServiceProcess;
use vaas_tests::{StoreKind, System, connection_limit_update, millis, percentile, respond_async};

/// Calls to the API in flight at once while the cluster is set up.
const SET_UP_CONCURRENCY: usize = 16;

/// Longest wait for every agent to attach.
const ATTACH_DEADLINE: Duration = Duration::from_secs(300);

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let full = std::env::var("VAAS_BENCH_MODE").is_ok_and(|mode| mode == "full");
    let agents: usize = env_or("VAAS_BENCH_AGENTS", if full { "1000" } else { "100" }).parse()?;
    let rounds: usize = env_or("VAAS_BENCH_ROUNDS", "5").parse()?;
    println!(
        "fan-out benchmark: {agents} servers, each with its own vaas-agent process, one \
         scheduler, {rounds} rounds, SQLite store, release build"
    );
    let mut system = System::builder(StoreKind::Sqlite).agents(0).start().await?;
    let secret_dir = tempfile::tempdir()?;
    let secret_file = secret_dir.path().join("secret");
    std::fs::write(&secret_file, b"fan-out stand-in secret\n")?;
    let secret = Arc::new(std::fs::read(&secret_file)?);

    let cluster = create_cluster(&system).await?;
    let mut standins = Vec::with_capacity(agents);
    for _ in 0..agents {
        standins.push(StandIn::start(secret.clone()).await?);
    }
    let started = Instant::now();
    let server_ids = register_servers(&system, &cluster, &standins).await?;
    let mut processes = Vec::with_capacity(agents);
    for (server_id, standin) in server_ids.iter().zip(&standins) {
        processes.push(
            system
                .spawn_agent_for(*server_id, standin.addr, &secret_file)
                .await?,
        );
    }
    wait_all_attached(&system, cluster.cluster_id, agents).await?;
    let attached = started.elapsed();
    let activated = activate_servers(&system, &server_ids).await?;
    ensure!(
        standins.iter().all(|standin| standin.active().is_some()),
        "every server got its VCL when it was activated"
    );
    println!(
        "set-up: {agents} servers registered and their agents attached in {:.1} s; activating \
         them all (asynchronous writes) took {:.1} s until the last task was terminal",
        attached.as_secs_f64(),
        activated.as_secs_f64()
    );

    let floor_standins = {
        let mut floor = Vec::with_capacity(agents);
        for _ in 0..agents {
            floor.push(StandIn::start(secret.clone()).await?);
        }
        floor
    };
    let mut floor_clis = Vec::with_capacity(agents);
    for standin in &floor_standins {
        floor_clis.push(VarnishCli::connect(standin.addr, &secret, CliTimeouts::default()).await?);
    }

    let mut writes = Vec::with_capacity(rounds);
    let mut reloads = Vec::with_capacity(rounds);
    let mut floors = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let before: Vec<Option<String>> = standins.iter().map(StandIn::active).collect();
        let (write, reload) = time_write(&system, cluster.backend_id, 100 + round as u32).await?;
        for (standin, before) in standins.iter().zip(&before) {
            ensure!(
                standin.active().is_some() && standin.active() != *before,
                "the write answered before every server ran its new VCL"
            );
        }
        writes.push(write);
        reloads.push(reload);
        let text = standins[0].last_vcl_text();
        floors.push(time_floor(&mut floor_clis, &format!("floor{round}"), &text).await?);
    }

    let scheduler = system.resident_kib()[1].1.unwrap_or_default();
    let mut agent_kib: Vec<u64> = processes
        .iter()
        .filter_map(ServiceProcess::resident_kib)
        .collect();
    agent_kib.sort_unstable();
    ensure!(!agent_kib.is_empty(), "the agents' memory can be read");
    println!(
        "{:>8} | {:>22} | {:>22} | {:>22}",
        "servers", "floor p50 / max (ms)", "reload p50 / max (ms)", "write p50 / max (ms)"
    );
    let max = |samples: &[Duration]| millis(samples.iter().copied().max().unwrap_or_default());
    println!(
        "{agents:>8} | {:>10.1} / {:>9.1} | {:>10.1} / {:>9.1} | {:>10.1} / {:>9.1}",
        millis(percentile(&mut floors, 0.5)),
        max(&floors),
        millis(percentile(&mut reloads, 0.5)),
        max(&reloads),
        millis(percentile(&mut writes, 0.5)),
        max(&writes),
    );
    println!(
        "         | floor: the same VCL with vcl.inline + vcl.use to {agents} stand-ins at once \
         over open connections; reload: the task's start until it finished (snapshot, prepare \
         and commit on every agent); write: a synchronous UpdateBackend until it answered"
    );
    println!(
        "         | resident memory after the run: vaas-scheduler {} MiB; vaas-agent median {} \
         MiB, max {} MiB",
        scheduler / 1024,
        agent_kib[agent_kib.len() / 2] / 1024,
        agent_kib[agent_kib.len() - 1] / 1024,
    );
    drop(processes);
    system.ensure_running()
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// The ids of the benchmark's cluster and of what its VCL is made of.
struct BenchCluster {
    dc_id: i64,
    cluster_id: i64,
    template_id: i64,
    backend_id: i64,
}

/// Creates a dc, a cluster, a template and one director with one backend.
async fn create_cluster(system: &System) -> Result<BenchCluster> {
    let (dc_id, cluster_id, template_id) = system.create_cluster_base().await?;
    let mut config = system.config();
    let director_id = config
        .create_director(CreateDirectorRequest {
            director: Some(Director {
                name: "fanout".into(),
                cluster_ids: vec![cluster_id],
                route_expression: "^/".into(),
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .director
        .context("director")?
        .id;
    let backend_id = config
        .create_backend(CreateBackendRequest {
            backend: Some(Backend {
                director_id,
                dc_id,
                address: "127.0.0.1".into(),
                port: Some(8080),
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .backend
        .context("backend")?
        .id;
    Ok(BenchCluster {
        dc_id,
        cluster_id,
        template_id,
        backend_id,
    })
}

/// Registers one server in maintenance per stand-in (asynchronous writes: their reloads, which
/// find no agent yet, run meanwhile); returns their ids in the same order.
async fn register_servers(
    system: &System,
    cluster: &BenchCluster,
    standins: &[StandIn],
) -> Result<Vec<i64>> {
    futures::stream::iter(standins)
        .map(|standin| {
            let mut config = system.config();
            let server = VarnishServer {
                address: "127.0.0.1".into(),
                http_port: Some(80),
                admin_port: Some(u32::from(standin.addr.port())),
                status: ServerStatus::Maintenance as i32,
                dc_id: cluster.dc_id,
                template_id: cluster.template_id,
                cluster_id: cluster.cluster_id,
                ..Default::default()
            };
            async move {
                let created = config
                    .create_varnish_server(respond_async(CreateVarnishServerRequest {
                        varnish_server: Some(server),
                    }))
                    .await?
                    .into_inner();
                Ok::<i64, anyhow::Error>(created.varnish_server.context("server")?.id)
            }
        })
        .buffered(SET_UP_CONCURRENCY)
        .try_collect()
        .await
}

/// Waits until every server of the cluster shows that its agent attached.
async fn wait_all_attached(system: &System, cluster_id: i64, servers: usize) -> Result<()> {
    let deadline = Instant::now() + ATTACH_DEADLINE;
    loop {
        let mut attached = 0;
        let mut page_token = String::new();
        loop {
            let listed = system
                .config()
                .list_varnish_servers(ListVarnishServersRequest {
                    page_size: 1000,
                    page_token,
                    cluster_id,
                    ..Default::default()
                })
                .await?
                .into_inner();
            attached += listed
                .varnish_servers
                .iter()
                .filter(|server| {
                    server.agent_seen_time.is_some()
                        && server.sync_state != SyncState::Disconnected as i32
                })
                .count();
            if listed.next_page_token.is_empty() {
                break;
            }
            page_token = listed.next_page_token;
        }
        if attached >= servers {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "only {attached} of {servers} agents attached within {ATTACH_DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Activates every server with asynchronous writes and waits until the last task is terminal;
/// returns how long that took.
async fn activate_servers(system: &System, server_ids: &[i64]) -> Result<Duration> {
    let started = Instant::now();
    let tasks: Vec<i64> = futures::stream::iter(server_ids)
        .map(|&id| {
            let mut config = system.config();
            async move {
                let answer = config
                    .update_varnish_server(respond_async(UpdateVarnishServerRequest {
                        varnish_server: Some(VarnishServer {
                            id,
                            status: ServerStatus::Active as i32,
                            ..Default::default()
                        }),
                        update_mask: Some(prost_types::FieldMask {
                            paths: vec!["status".to_owned()],
                        }),
                    }))
                    .await?
                    .into_inner();
                Ok::<Vec<i64>, anyhow::Error>(answer.tasks.iter().map(|task| task.id).collect())
            }
        })
        .buffered(SET_UP_CONCURRENCY)
        .try_collect::<Vec<Vec<i64>>>()
        .await?
        .into_iter()
        .flatten()
        .collect();
    let last = *tasks
        .iter()
        .max()
        .context("activating servers made tasks")?;
    let updates = system.watch(last).await?;
    let done = updates.last().context("the watch saw the task")?;
    ensure!(
        done.state == TaskState::Success as i32,
        "activating the servers failed: {}",
        done.error
    );
    Ok(started.elapsed())
}

/// Changes the backend's connection limit with a synchronous write; returns how long the write
/// took to answer and how long its reload ran (its start until its tasks finished).
async fn time_write(system: &System, backend_id: i64, limit: u32) -> Result<(Duration, Duration)> {
    let started = Instant::now();
    let answer = system
        .config()
        .update_backend(connection_limit_update(backend_id, limit))
        .await?
        .into_inner();
    let write = started.elapsed();
    let task = answer.tasks.first().context("the write made a task")?;
    ensure!(
        task.state == TaskState::Success as i32,
        "the reload failed: {}",
        task.error
    );
    let task = system.task(task.id).await?;
    let start = task.start_time.context("the task has a start time")?;
    let finish = task.finish_time.context("the task has a finish time")?;
    let reload = Duration::from_nanos(
        ((finish.seconds - start.seconds) * 1_000_000_000 + i64::from(finish.nanos - start.nanos))
            .max(0) as u64,
    );
    Ok((write, reload))
}

/// Sends `vcl.inline` of `text` as `name`, then `vcl.use`, on every connection at once; returns
/// how long until the last one answered.
async fn time_floor(clis: &mut [VarnishCli], name: &str, text: &str) -> Result<Duration> {
    let started = Instant::now();
    futures::future::try_join_all(clis.iter_mut().map(|cli| async move {
        cli.vcl_inline(name, text).await?;
        cli.vcl_use(name).await
    }))
    .await?;
    Ok(started.elapsed())
}

/// A stand-in for one varnishd's admin endpoint: it speaks the CLI protocol, checks the answer
/// to its authentication challenge, and answers every command at once, keeping the VCLs and
/// labels it was given so that `vcl.list` shows what was loaded.
struct StandIn {
    addr: SocketAddr,
    vcls: Arc<Mutex<Vcls>>,
}

/// What a stand-in was given.
#[derive(Default)]
struct Vcls {
    /// Loaded VCLs and labels, in load order: a label has the VCL it points to.
    loaded: Vec<(String, Option<String>)>,
    active: Option<String>,
    last_text: String,
}

impl StandIn {
    /// Listens on a free loopback port and serves every connection in the background.
    async fn start(secret: Arc<Vec<u8>>) -> Result<StandIn> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let vcls = Arc::new(Mutex::new(Vcls::default()));
        let served = vcls.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, secret.clone(), served.clone()));
            }
        });
        Ok(StandIn { addr, vcls })
    }

    /// Returns the name of the active VCL.
    fn active(&self) -> Option<String> {
        self.vcls.lock().expect("stand-in state").active.clone()
    }

    /// Returns the text of the last VCL loaded.
    fn last_vcl_text(&self) -> String {
        self.vcls.lock().expect("stand-in state").last_text.clone()
    }
}

/// Serves one CLI connection until the peer closes it.
async fn serve(stream: TcpStream, secret: Arc<Vec<u8>>, vcls: Arc<Mutex<Vcls>>) -> Result<()> {
    stream.set_nodelay(true)?;
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let challenge = challenge();
    respond(
        &mut write,
        107,
        &format!("{challenge}\n\nAuthentication required.\n"),
    )
    .await?;
    let mut line = String::new();
    read.read_line(&mut line).await?;
    if line.trim_end() != format!("auth {}", auth_response(&challenge, &secret)) {
        return respond(&mut write, 107, "Authentication failed.").await;
    }
    respond(
        &mut write,
        200,
        "-----------------------------\nVarnish Cache CLI 1.0\n-----------------------------\n\
         Linux,stand-in\nvarnish-7.1.1 revision stand-in\n\nType 'help' for command list.\n",
    )
    .await?;
    loop {
        line.clear();
        if read.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let request = line.trim_end_matches('\n').to_owned();
        let (command, text) = match request.split_once(" << ") {
            Some((command, token)) => {
                let mut text = String::new();
                loop {
                    let mut next = String::new();
                    ensure!(read.read_line(&mut next).await? > 0, "unterminated heredoc");
                    if next.trim_end_matches('\n') == token {
                        break;
                    }
                    text.push_str(&next);
                }
                (command.to_owned(), text)
            }
            None => (request, String::new()),
        };
        let args: Vec<&str> = command.split_whitespace().collect();
        let (status, body) = vcls.lock().expect("stand-in state").answer(&args, text);
        respond(&mut write, status, &body).await?;
    }
}

impl Vcls {
    /// Carries out one command at once; returns the status and body varnishd would give.
    fn answer(&mut self, args: &[&str], text: String) -> (u16, String) {
        let known = |vcls: &Vcls, name: &str| vcls.loaded.iter().any(|(loaded, _)| loaded == name);
        match args {
            ["ping"] => (200, "PONG 1 1.0".into()),
            ["status"] => (200, "Child in state running".into()),
            ["start"] => (300, "Child in state running".into()),
            ["param.show", "-j", name] => (200, param_json(name)),
            ["vcl.list", "-j"] => (200, self.list_json()),
            ["vcl.inline", name] if !known(self, name) => {
                self.loaded.push(((*name).to_owned(), None));
                self.last_text = text;
                (200, "VCL compiled.".into())
            }
            ["vcl.use", name] if known(self, name) => {
                self.active = Some((*name).to_owned());
                (200, format!("VCL '{name}' now active"))
            }
            ["vcl.label", label, vcl] if known(self, vcl) => {
                self.loaded.retain(|(name, _)| name != label);
                self.loaded
                    .push(((*label).to_owned(), Some((*vcl).to_owned())));
                (200, String::new())
            }
            ["vcl.discard", name] if self.active.as_deref() != Some(*name) => {
                self.loaded.retain(|(loaded, _)| loaded != name);
                (200, String::new())
            }
            ["vcl.state", _, _] => (200, String::new()),
            _ => (106, format!("stand-in cannot do {args:?}")),
        }
    }

    /// Returns `vcl.list -j` of what is loaded.
    fn list_json(&self) -> String {
        let mut items = vec![r#"2, ["vcl.list", "-j"], 1.0"#.to_owned()];
        for (name, target) in &self.loaded {
            let status = if self.active.as_deref() == Some(name) {
                "active"
            } else {
                "available"
            };
            items.push(match target {
                Some(target) => format!(
                    r#"{{"status": "available", "state": "label", "temperature": "warm", "busy": 0, "name": "{name}", "label": {{"name": "{target}", "refs": 0}}}}"#
                ),
                None => format!(
                    r#"{{"status": "{status}", "state": "auto", "temperature": "warm", "busy": 0, "name": "{name}"}}"#
                ),
            });
        }
        format!("[{}]", items.join(",\n"))
    }
}

/// Returns `param.show -j NAME` of a hardened varnishd: every hardening parameter off and
/// protected.
fn param_json(name: &str) -> String {
    let value = match name {
        "vcc_unsafe_path" | "vcc_allow_inline_c" => "false",
        "cc_command" => r#""exec cc -O1 stand-in""#,
        _ => r#""/usr/lib/varnish/vmods""#,
    };
    format!(
        r#"[2, ["param.show", "-j", "{name}"], 1.0, {{"name": "{name}", "value": {value}, "flags": ["protected"]}}]"#
    )
}

/// Returns a fresh 32-letter challenge.
fn challenge() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut letters = String::with_capacity(32);
    while letters.len() < 32 {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_usize(letters.len());
        let bits = hasher.finish();
        letters.extend((0..8).map(|shift| char::from(b'a' + ((bits >> (shift * 8)) % 26) as u8)));
    }
    letters
}

/// Writes one CLI response: the 13-byte header, the body and a newline.
async fn respond(
    write: &mut tokio::net::tcp::OwnedWriteHalf,
    status: u16,
    body: &str,
) -> Result<()> {
    let mut response = format!("{status:<3} {:<8}\n", body.len()).into_bytes();
    response.extend_from_slice(body.as_bytes());
    response.push(b'\n');
    write.write_all(&response).await?;
    Ok(())
}
