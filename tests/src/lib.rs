//! The end-to-end harness: starts the real `vaas-api`, `vaas-scheduler` and `vaas-agent`
//! binaries beside real `nats-server`, SQLite or PostgreSQL, and `varnishd` processes, each on
//! free ports with its own directory, and hands tests gRPC clients to drive them as a user would.
//!
//! Every process's log is printed when a test fails. The binaries are built (incrementally) with
//! cargo the first time a test process needs them, so a test never runs stale binaries.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use futures::StreamExt;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use vaas_proto::v1::config_service_client::ConfigServiceClient;
use vaas_proto::v1::task_service_client::TaskServiceClient;
use vaas_proto::v1::token_service_client::TokenServiceClient;
use vaas_proto::v1::{
    Backend, Cluster, CreateClusterRequest, CreateDcRequest, CreateDirectorRequest,
    CreateTokenRequest, CreateVarnishServerRequest, CreateVclTemplateRequest, Dc, Director,
    GetClusterRequest, GetTaskRequest, GetVarnishServerRequest, Role, ServerStatus, Task,
    TaskState, UpdateVarnishServerRequest, VarnishServer, VclTemplate, WatchTaskRequest,
};
use vaas_testkit::{Nats, Postgres, ServiceProcess, TlsFiles, Varnishd, free_port};

/// Declares, for each named `async fn name(store: StoreKind) -> anyhow::Result<()>`, one test in
/// module `sqlite` and one in module `postgres`.
#[macro_export]
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() -> anyhow::Result<()> {
                super::$name($crate::StoreKind::Sqlite).await
            })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() -> anyhow::Result<()> {
                super::$name($crate::StoreKind::Postgres).await
            })*
        }
    };
}

/// A client channel that sends `authorization: Bearer <token>` with every call.
pub type Authed = InterceptedService<Channel, Bearer>;

/// Adds a bearer token to every call (none when built without one).
#[derive(Clone, Debug)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    /// Returns an interceptor sending `token`; a token that cannot be metadata is sent as is
    /// would be refused anyway, so it becomes an empty (refused) one.
    pub fn new(token: Option<&str>) -> Bearer {
        Bearer(token.map(|token| {
            format!("Bearer {token}")
                .parse()
                .unwrap_or_else(|_| MetadataValue::from_static("Bearer -"))
        }))
    }
}

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Wraps `message` in a request that asks for an answer as soon as the change is saved
/// (`prefer: respond-async`).
pub fn respond_async<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("prefer", MetadataValue::from_static("respond-async"));
    request
}

/// Which store the system runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    /// An SQLite file in the system's directory.
    Sqlite,
    /// A PostgreSQL server of its own.
    Postgres,
}

/// Options of a [`System`].
#[derive(Clone, Debug)]
pub struct SystemBuilder {
    store: StoreKind,
    agents: usize,
    schedulers: usize,
    tls: bool,
}

impl SystemBuilder {
    /// Sets the number of varnishd processes (default 1); each gets its agent once it is
    /// registered as a server ([`System::set_up`] does it for the first).
    pub fn agents(mut self, agents: usize) -> SystemBuilder {
        self.agents = agents;
        self
    }

    /// Sets the number of scheduler replicas (default 1); the first one starts as the leader.
    pub fn schedulers(mut self, schedulers: usize) -> SystemBuilder {
        self.schedulers = schedulers.max(1);
        self
    }

    /// Turns TLS on every gRPC hop on or off (default off): the API and the scheduler serve TLS
    /// with a certificate of a throwaway CA, the scheduler asks agents for a client certificate
    /// (mutual TLS), and the agents and this harness connect with `https://`.
    pub fn tls(mut self, on: bool) -> SystemBuilder {
        self.tls = on;
        self
    }

    /// Starts everything but the agents and returns once the API serves, with an admin token
    /// for the harness's clients.
    pub async fn start(self) -> Result<System> {
        let binaries = binaries()?;
        let dir = tempfile::Builder::new().prefix("vaas-e2e-").tempdir()?;
        let tls = if self.tls {
            Some(TlsFiles::generate()?)
        } else {
            None
        };
        let nats = Nats::start().await?;
        let (postgres, database_url) = match self.store {
            StoreKind::Sqlite => {
                let path = dir.path().join("vaas.db");
                (None, format!("sqlite://{}?mode=rwc", path.display()))
            }
            StoreKind::Postgres => {
                let postgres = Postgres::start().await?;
                let url = postgres.url();
                (Some(postgres), url)
            }
        };
        let mut schedulers = Vec::with_capacity(self.schedulers);
        for index in 0..self.schedulers {
            let port = free_port();
            let mut flags = server_tls_flags(tls.as_ref(), true);
            flags.extend([
                ("--listen", format!("127.0.0.1:{port}")),
                ("--database-url", database_url.clone()),
                ("--nats-url", nats.url()),
                ("--nats-user", nats.user().to_owned()),
                (
                    "--nats-password-file",
                    nats.password_file().display().to_string(),
                ),
                ("--reconcile-interval", "2s".to_owned()),
                ("--agent-wait", "2s".to_owned()),
                // Transient failures are retried 1 s and 2 s later: tests of failures stay short.
                ("--reload-attempts", "3".to_owned()),
                ("--lease-ttl", "3s".to_owned()),
                ("--replica-id", format!("scheduler-{index}")),
            ]);
            let mut process = start_scheduler(&binaries, &flags, dir.path(), index, 1).await?;
            if index == 0 {
                process.wait_for_log(LEADING).await?;
            }
            schedulers.push(SchedulerReplica {
                flags,
                port,
                starts: 1,
                stopped: false,
                process,
            });
        }
        let scheduler_urls = schedulers
            .iter()
            .map(|replica| format!("{}://127.0.0.1:{}", scheme(tls.as_ref()), replica.port))
            .collect::<Vec<_>>()
            .join(",");
        let api_port = free_port();
        let mut api = ServiceProcess::spawn(
            "vaas-api",
            service_command(
                &binaries.api,
                &[
                    ("--listen", format!("127.0.0.1:{api_port}")),
                    ("--database-url", database_url.clone()),
                    ("--nats-url", nats.url()),
                    ("--nats-user", nats.user().to_owned()),
                    (
                        "--nats-password-file",
                        nats.password_file().display().to_string(),
                    ),
                    ("--sync-timeout", "60s".to_owned()),
                ]
                .into_iter()
                .chain(server_tls_flags(tls.as_ref(), false))
                .collect::<Vec<_>>(),
            ),
            &dir.path().join("api.log"),
        )?;
        api.wait_for_log("vaas-api serving").await?;
        let admin_token = create_token(&binaries, &database_url, "harness-admin", "admin")?;
        let mut varnishds = Vec::with_capacity(self.agents);
        for _ in 0..self.agents {
            varnishds.push(Varnishd::start().await?);
        }
        let agents = (0..self.agents).map(|_| None).collect();
        let channel =
            Channel::from_shared(format!("{}://127.0.0.1:{api_port}", scheme(tls.as_ref())))?;
        let channel = match &tls {
            Some(files) => channel.tls_config(client_tls(files, false)?)?,
            None => channel,
        };
        let channel = channel
            .connect()
            .await
            .context("cannot connect to vaas-api")?;
        Ok(System {
            channel,
            binaries,
            scheduler_urls,
            agent_starts: vec![0; self.agents],
            agents,
            api,
            schedulers,
            varnishds,
            _postgres: postgres,
            nats,
            api_port,
            tls,
            admin_token,
            _dir: dir,
        })
    }
}

/// A running VaaS with its NATS, store and Varnish servers; everything stops on drop.
pub struct System {
    channel: Channel,
    binaries: Binaries,
    scheduler_urls: String,
    agent_starts: Vec<usize>,
    // Fields drop in order: agents before varnishd, services before NATS and the store.
    agents: Vec<Option<ServiceProcess>>,
    api: ServiceProcess,
    schedulers: Vec<SchedulerReplica>,
    varnishds: Vec<Varnishd>,
    _postgres: Option<Postgres>,
    nats: Nats,
    api_port: u16,
    tls: Option<TlsFiles>,
    admin_token: String,
    _dir: tempfile::TempDir,
}

impl System {
    /// Returns a builder for a system on `store`.
    pub fn builder(store: StoreKind) -> SystemBuilder {
        SystemBuilder {
            store,
            agents: 1,
            schedulers: 1,
            tls: false,
        }
    }

    /// Returns the API's gRPC address.
    pub fn api_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.api_port))
    }

    /// Returns the gRPC (AgentService) address of scheduler replica `index`.
    pub fn scheduler_addr(&self, index: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.schedulers[index].port))
    }

    /// Returns the certificates and keys of a system started with TLS.
    pub fn tls_files(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// Returns the channel to the API (calls on it carry no token).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Returns the secret of the admin token the harness's clients use.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// Returns a ConfigService client calling with the admin token.
    pub fn config(&self) -> ConfigServiceClient<Authed> {
        self.config_as(Some(&self.admin_token))
    }

    /// Returns a ConfigService client calling with `token` (or none).
    pub fn config_as(&self, token: Option<&str>) -> ConfigServiceClient<Authed> {
        ConfigServiceClient::with_interceptor(self.channel.clone(), Bearer::new(token))
    }

    /// Returns a TaskService client calling with the admin token.
    pub fn tasks(&self) -> TaskServiceClient<Authed> {
        TaskServiceClient::with_interceptor(
            self.channel.clone(),
            Bearer::new(Some(&self.admin_token)),
        )
    }

    /// Returns a TokenService client calling with `token` (or none).
    pub fn tokens_as(&self, token: Option<&str>) -> TokenServiceClient<Authed> {
        TokenServiceClient::with_interceptor(self.channel.clone(), Bearer::new(token))
    }

    /// Returns a TokenService client calling with the admin token.
    pub fn tokens(&self) -> TokenServiceClient<Authed> {
        self.tokens_as(Some(&self.admin_token))
    }

    /// Reads a cluster through the API.
    pub async fn cluster(&self, id: i64) -> Result<Cluster> {
        let response = self.config().get_cluster(GetClusterRequest { id }).await?;
        response
            .into_inner()
            .cluster
            .context("GetCluster answered no cluster")
    }

    /// Reads a Varnish server through the API.
    pub async fn server(&self, id: i64) -> Result<VarnishServer> {
        let response = self
            .config()
            .get_varnish_server(GetVarnishServerRequest { id })
            .await?;
        response
            .into_inner()
            .varnish_server
            .context("GetVarnishServer answered no server")
    }

    /// Returns the system's NATS server (clients must log in with its user and password).
    pub fn nats(&self) -> &Nats {
        &self.nats
    }

    /// Returns the system's NATS server to stop and start again.
    pub fn nats_mut(&mut self) -> &mut Nats {
        &mut self.nats
    }

    /// Returns the number of subscriptions NATS holds, from its monitoring endpoint.
    pub async fn nats_subscriptions(&self) -> Result<u64> {
        let response =
            vaas_testkit::http_get(self.nats.monitor_addr(), "/subsz", "localhost").await?;
        let counted = response
            .body
            .split("\"num_subscriptions\":")
            .nth(1)
            .and_then(|rest| rest.trim_start().split([',', '}']).next())
            .and_then(|number| number.trim().parse().ok())
            .with_context(|| format!("no num_subscriptions in {}", response.body))?;
        Ok(counted)
    }

    /// Reads a director through the API.
    pub async fn director(&self, id: i64) -> Result<Director> {
        let response = self
            .config()
            .get_director(vaas_proto::v1::GetDirectorRequest { id })
            .await?;
        response
            .into_inner()
            .director
            .context("GetDirector answered no director")
    }

    /// Reads a task through the API.
    pub async fn task(&self, id: i64) -> Result<Task> {
        let response = self.tasks().get_task(GetTaskRequest { id }).await?;
        response
            .into_inner()
            .task
            .context("GetTask answered no task")
    }

    /// Follows a task with WatchTask until the stream ends (after a terminal state); returns
    /// every update in order. Fails when two updates are more than two minutes apart.
    pub async fn watch(&self, id: i64) -> Result<Vec<Task>> {
        let mut watch = self
            .tasks()
            .watch_task(WatchTaskRequest { id })
            .await?
            .into_inner();
        let mut updates = Vec::new();
        while let Some(update) = tokio::time::timeout(Duration::from_secs(120), watch.next())
            .await
            .context("the watch stalled")?
        {
            updates.push(update?.task.context("a watch update without a task")?);
        }
        Ok(updates)
    }

    /// Returns the varnishd of Varnish server `index`.
    pub fn varnishd(&self, index: usize) -> &Varnishd {
        &self.varnishds[index]
    }

    /// Restarts varnishd `index` while its agent keeps running: same ports, `-n` directory and
    /// secret, and no VCL, as an operator's restart leaves it. Returns once its admin port
    /// answers; bringing its VCL back is the agent's job.
    pub async fn restart_varnishd(&mut self, index: usize) -> Result<()> {
        self.varnishds[index].restart().await
    }

    /// Fails unless the API, the scheduler and every agent are still running.
    pub fn ensure_running(&mut self) -> Result<()> {
        self.api.ensure_running().context("vaas-api")?;
        for replica in self
            .schedulers
            .iter_mut()
            .filter(|replica| !replica.stopped)
        {
            replica.process.ensure_running().context("vaas-scheduler")?;
        }
        for agent in self.agents.iter_mut().flatten() {
            agent.ensure_running().context("vaas-agent")?;
        }
        Ok(())
    }

    /// Returns the resident memory in KiB of the API, the scheduler and the first agent.
    pub fn resident_kib(&self) -> [(&'static str, Option<u64>); 3] {
        [
            ("vaas-api", self.api.resident_kib()),
            ("vaas-scheduler", self.schedulers[0].process.resident_kib()),
            (
                "vaas-agent",
                self.agents
                    .first()
                    .and_then(Option::as_ref)
                    .and_then(ServiceProcess::resident_kib),
            ),
        ]
    }

    /// Stops scheduler replica `index` (SIGTERM, then SIGKILL after a grace period).
    pub fn stop_scheduler(&mut self, index: usize) {
        self.schedulers[index].process.stop();
        self.schedulers[index].stopped = true;
    }

    /// Starts scheduler replica `index` again with the same flags. With a single replica, also
    /// waits until it leads and every agent re-attached.
    pub async fn restart_scheduler(&mut self, index: usize) -> Result<()> {
        let single = self.schedulers.len() == 1;
        let agents = self.agents.iter().flatten().count();
        let replica = &mut self.schedulers[index];
        replica.process.stop();
        replica.starts += 1;
        replica.process = start_scheduler(
            &self.binaries,
            &replica.flags,
            self._dir.path(),
            index,
            replica.starts,
        )
        .await?;
        replica.stopped = false;
        if single {
            replica.process.wait_for_log(LEADING).await?;
            // The new scheduler logs each agent that attaches to it.
            replica
                .process
                .wait_for_log_count("agent attached", agents)
                .await?;
        }
        Ok(())
    }

    /// Waits until scheduler replica `index` leads.
    pub async fn wait_until_leading(&mut self, index: usize) -> Result<()> {
        self.schedulers[index].process.wait_for_log(LEADING).await
    }

    /// Stops the agent of Varnish server `index`.
    pub fn stop_agent(&mut self, index: usize) {
        if let Some(agent) = &mut self.agents[index] {
            agent.stop();
        }
    }

    /// Starts the agent of varnishd `index` (again) with the token file written by
    /// [`System::attach_agent`] and waits until it attached.
    pub async fn restart_agent(&mut self, index: usize) -> Result<()> {
        self.stop_agent(index);
        self.agent_starts[index] += 1;
        let agent = start_agent(
            &self.binaries,
            &self.scheduler_urls,
            self.tls.as_ref(),
            &self.varnishds[index],
            self._dir.path(),
            index,
            self.agent_starts[index],
        )
        .await?;
        self.agents[index] = Some(agent);
        Ok(())
    }

    /// Gives varnishd `index`, registered as server `server_id`, its agent: creates an agent
    /// token bound to the server through the API, writes it where the agent reads it, starts
    /// the agent and waits until it attached.
    pub async fn attach_agent(&mut self, index: usize, server_id: i64) -> Result<()> {
        let secret = self
            .tokens()
            .create_token(CreateTokenRequest {
                name: format!("agent-{index}-{server_id}"),
                role: Role::Agent as i32,
                varnish_server_id: server_id,
                ttl: None,
            })
            .await?
            .into_inner()
            .secret;
        std::fs::write(agent_token_file(self._dir.path(), index), secret)?;
        self.restart_agent(index).await
    }

    /// Returns how many reloads the scheduler (its current run) reported as succeeded.
    pub fn succeeded_reloads(&self) -> usize {
        self.schedulers
            .iter()
            .map(|replica| replica.process.count_in_log("reload succeeded"))
            .sum()
    }

    /// Waits until the first scheduler replica logged `line` (within the log wait's deadline).
    pub async fn wait_for_scheduler_log(&mut self, line: &str) -> Result<()> {
        self.schedulers[0].process.wait_for_log(line).await
    }

    /// Returns the logs of every scheduler replica so far.
    pub fn scheduler_log(&self) -> String {
        self.schedulers
            .iter()
            .map(|replica| replica.process.log())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The log line of a scheduler replica that takes the leader lease.
const LEADING: &str = "leading: this replica drives reloads";

/// One scheduler replica and how to start it again.
struct SchedulerReplica {
    flags: Vec<(&'static str, String)>,
    port: u16,
    starts: usize,
    stopped: bool,
    process: ServiceProcess,
}

/// Starts scheduler replica `index` (its `run`-th start, for the log file's name) and waits
/// until it serves.
async fn start_scheduler(
    binaries: &Binaries,
    flags: &[(&str, String)],
    dir: &std::path::Path,
    index: usize,
    run: usize,
) -> Result<ServiceProcess> {
    let mut scheduler = ServiceProcess::spawn(
        &format!("vaas-scheduler-{index}"),
        service_command(&binaries.scheduler, flags),
        &dir.join(format!("scheduler-{index}-{run}.log")),
    )?;
    scheduler.wait_for_log("vaas-scheduler serving").await?;
    Ok(scheduler)
}

/// Starts the agent of `varnishd` (its `run`-th start) and waits until it attached.
async fn start_agent(
    binaries: &Binaries,
    scheduler_urls: &str,
    tls: Option<&TlsFiles>,
    varnishd: &Varnishd,
    dir: &std::path::Path,
    index: usize,
    run: usize,
) -> Result<ServiceProcess> {
    let mut flags = agent_tls_flags(tls);
    flags.extend([
        ("--scheduler-url", scheduler_urls.to_owned()),
        (
            "--token-file",
            agent_token_file(dir, index).display().to_string(),
        ),
        ("--varnish-admin", varnishd.admin_addr().to_string()),
        (
            "--varnish-secret-file",
            varnishd.secret_file().display().to_string(),
        ),
        ("--server-address", "127.0.0.1".to_owned()),
        (
            "--state-dir",
            dir.join(format!("agent-{index}-state"))
                .display()
                .to_string(),
        ),
    ]);
    let mut agent = ServiceProcess::spawn(
        &format!("vaas-agent-{index}"),
        service_command(&binaries.agent, &flags),
        &dir.join(format!("agent-{index}-{run}.log")),
    )?;
    agent.wait_for_log("attached to scheduler").await?;
    Ok(agent)
}

/// Returns where the token of agent `index` is kept.
fn agent_token_file(dir: &std::path::Path, index: usize) -> PathBuf {
    dir.join(format!("agent-{index}.token"))
}

/// Creates a token directly in the store with `vaas-api create-token` and returns its secret.
fn create_token(binaries: &Binaries, database_url: &str, name: &str, role: &str) -> Result<String> {
    let output = Command::new(&binaries.api)
        .args(["create-token", "--database-url", database_url])
        .args(["--name", name, "--role", role])
        .output()
        .context("cannot run vaas-api create-token")?;
    ensure!(
        output.status.success(),
        "vaas-api create-token failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?.trim().to_owned())
}

/// Returns the URL scheme of the system's gRPC endpoints.
fn scheme(tls: Option<&TlsFiles>) -> &'static str {
    if tls.is_some() { "https" } else { "http" }
}

/// Returns the TLS flags of a gRPC server (`mutual`: it asks clients for a certificate of the CA).
fn server_tls_flags(tls: Option<&TlsFiles>, mutual: bool) -> Vec<(&'static str, String)> {
    let Some(files) = tls else {
        return Vec::new();
    };
    let mut flags = vec![
        ("--tls-cert", files.server_cert().display().to_string()),
        ("--tls-key", files.server_key().display().to_string()),
    ];
    if mutual {
        flags.push(("--tls-client-ca", files.ca_cert().display().to_string()));
    }
    flags
}

/// Returns the TLS flags of an agent: the CA to trust and its client certificate.
fn agent_tls_flags(tls: Option<&TlsFiles>) -> Vec<(&'static str, String)> {
    let Some(files) = tls else {
        return Vec::new();
    };
    vec![
        ("--tls-ca", files.ca_cert().display().to_string()),
        (
            "--tls-client-cert",
            files.client_cert().display().to_string(),
        ),
        ("--tls-client-key", files.client_key().display().to_string()),
    ]
}

/// Returns a client TLS configuration that trusts the system's CA and checks the name
/// `localhost`; with `client_certificate`, it also presents the client certificate.
pub fn client_tls(files: &TlsFiles, client_certificate: bool) -> Result<ClientTlsConfig> {
    let mut config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(files.ca_cert())?))
        .domain_name("localhost");
    if client_certificate {
        config = config.identity(tonic::transport::Identity::from_pem(
            std::fs::read(files.client_cert())?,
            std::fs::read(files.client_key())?,
        ));
    }
    Ok(config)
}

/// Paths of the three VaaS binaries.
#[derive(Clone, Debug)]
struct Binaries {
    api: PathBuf,
    scheduler: PathBuf,
    agent: PathBuf,
}

/// Builds the binaries once per test process (a no-op when they are fresh) and returns them.
fn binaries() -> Result<Binaries> {
    static BUILT: OnceLock<Result<Binaries, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build_binaries().map_err(|error| format!("{error:#}")))
        .clone()
        .map_err(|error| anyhow!(error))
}

fn build_binaries() -> Result<Binaries> {
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("tests/ has a parent")?
        .to_owned();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    // Benchmarks (built without debug assertions) measure release binaries.
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let mut command = Command::new(cargo);
    command.current_dir(&workspace).args(["build", "--quiet"]);
    for binary in ["vaas-api", "vaas-scheduler", "vaas-agent"] {
        command.args(["--bin", binary]);
    }
    if profile == "release" {
        command.arg("--release");
    }
    let output = command
        .output()
        .context("cannot run cargo build for the VaaS binaries")?;
    if !output.status.success() {
        return Err(anyhow!(
            "cargo build of the VaaS binaries failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join(profile);
    Ok(Binaries {
        api: target.join("vaas-api"),
        scheduler: target.join("vaas-scheduler"),
        agent: target.join("vaas-agent"),
    })
}

fn service_command(binary: &PathBuf, flags: &[(&str, String)]) -> Command {
    let mut command = Command::new(binary);
    for (flag, value) in flags {
        command.arg(flag).arg(value);
    }
    command.env(
        "RUST_LOG",
        "info,vaas_api=debug,vaas_scheduler=debug,vaas_agent=debug",
    );
    command
}

/// The ids of a dc, cluster, template, server and director set up through the API.
#[derive(Clone, Copy, Debug)]
pub struct Setup {
    /// Id of the created resource.
    pub dc_id: i64,
    /// Id of the created resource.
    pub cluster_id: i64,
    /// Id of the created resource.
    pub template_id: i64,
    /// Id of the created resource.
    pub server_id: i64,
    /// Id of the created resource.
    pub director_id: i64,
}

impl System {
    /// Creates, through the API, a dc, a cluster, a `<VCL/>` template, the first varnishd as a
    /// server with its agent, and a director "demo" routed by "^/"; checks that the server got
    /// its VCL. The server is registered in maintenance, gets its agent (whose token needs a
    /// registered server), and is then activated, as an operator brings in a new server.
    pub async fn set_up(&mut self) -> Result<Setup> {
        let mut config = self.config();
        let dc_id = config
            .create_dc(CreateDcRequest {
                dc: Some(Dc {
                    id: 0,
                    name: "Local".into(),
                    symbol: "local".into(),
                }),
            })
            .await?
            .into_inner()
            .dc
            .context("dc")?
            .id;
        let cluster_id = config
            .create_cluster(CreateClusterRequest {
                cluster: Some(Cluster {
                    name: "demo".into(),
                    ..Default::default()
                }),
            })
            .await?
            .into_inner()
            .cluster
            .context("cluster")?
            .id;
        let template_id = config
            .create_vcl_template(CreateVclTemplateRequest {
                vcl_template: Some(VclTemplate {
                    name: "default".into(),
                    content: "<VCL/>".into(),
                    ..Default::default()
                }),
            })
            .await?
            .into_inner()
            .vcl_template
            .context("template")?
            .id;
        let varnishd = self.varnishd(0);
        let registered = VarnishServer {
            address: "127.0.0.1".into(),
            http_port: Some(u32::from(varnishd.http_addr().port())),
            admin_port: Some(u32::from(varnishd.admin_addr().port())),
            status: ServerStatus::Maintenance as i32,
            dc_id,
            template_id,
            cluster_id,
            ..Default::default()
        };
        let create = respond_async(CreateVarnishServerRequest {
            varnish_server: Some(registered),
        });
        let server = config
            .create_varnish_server(create)
            .await?
            .into_inner()
            .varnish_server
            .context("server")?;
        let server_id = server.id;
        self.attach_agent(0, server_id).await?;
        let activated = config
            .update_varnish_server(UpdateVarnishServerRequest {
                varnish_server: Some(VarnishServer {
                    status: ServerStatus::Active as i32,
                    ..server
                }),
                update_mask: None,
            })
            .await?
            .into_inner();
        ensure!(
            activated
                .tasks
                .iter()
                .all(|task| task.state == TaskState::Success as i32),
            "an activated server gets its (empty) VCL before the write answers: {:?}",
            activated.tasks
        );
        let director_id = config
            .create_director(CreateDirectorRequest {
                director: Some(Director {
                    name: "demo".into(),
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
        Ok(Setup {
            dc_id,
            cluster_id,
            template_id,
            server_id,
            director_id,
        })
    }
}

/// Returns a backend of the set-up director pointing at `origin`.
pub fn backend_for(setup: &Setup, origin: SocketAddr) -> Backend {
    Backend {
        director_id: setup.director_id,
        dc_id: setup.dc_id,
        address: origin.ip().to_string(),
        port: Some(u32::from(origin.port())),
        ..Default::default()
    }
}
