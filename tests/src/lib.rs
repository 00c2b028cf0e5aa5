//! The end-to-end harness: starts the real `vaas-api`, `vaas-scheduler` and `vaas-agent`
//! binaries beside real `nats-server`, SQLite or PostgreSQL, and `varnishd` processes, each on
//! free ports with its own directory, and hands tests gRPC clients to drive them as a user would.
//!
//! Every process's log is printed when a test fails. The binaries are not built here: the harness
//! finds them in the cargo target directory beside the test executable (`deploy/test.sh` builds
//! them first with `cargo build --workspace --bins`) and refuses to run binaries older than the
//! sources. Readiness is what a client sees: gRPC health of the API and the scheduler (the
//! leader's `vaas.v1.AgentService` SERVING), and an agent's report in the API, never a log line.

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
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use vaas_proto::v1::config_service_client::ConfigServiceClient;
use vaas_proto::v1::status_service_client::StatusServiceClient;
use vaas_proto::v1::task_service_client::TaskServiceClient;
use vaas_proto::v1::token_service_client::TokenServiceClient;
use vaas_proto::v1::{
    Backend, Cluster, CreateBackendRequest, CreateClusterRequest, CreateDcRequest,
    CreateDirectorRequest, CreateTokenRequest, CreateVarnishServerRequest,
    CreateVclTemplateRequest, Dc, Director, GetClusterRequest, GetTaskRequest,
    GetVarnishServerRequest, Role, RouteCondition, RouteLeft, RouteOperator, ServerStatus,
    SyncState, Task, TaskState, UpdateBackendRequest, UpdateVarnishServerRequest, VarnishServer,
    VclTemplate, WatchTaskRequest,
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
    /// Extra flags of every agent.
    agent_flags: Vec<(&'static str, String)>,
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

    /// Makes the agents split their server's VCL into `shards` shard VCLs from `min_backends`
    /// backends on (default: the agent's own default, which leaves small clusters in one VCL).
    pub fn split_vcl(mut self, shards: usize, min_backends: usize) -> SystemBuilder {
        self.agent_flags = vec![
            ("--split-shards", shards.to_string()),
            ("--split-min-backends", min_backends.to_string()),
        ];
        self
    }

    /// Makes the agents always load one VCL, however large the cluster (`--split-min-backends
    /// off`).
    pub fn single_vcl(mut self) -> SystemBuilder {
        self.agent_flags = vec![("--split-min-backends", "off".to_owned())];
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
            let mut process =
                start_scheduler(&binaries, &flags, dir.path(), index, 1, tls.as_ref(), port)
                    .await?;
            if index == 0 {
                wait_serving(&mut process, port, tls.as_ref(), LEADER_SERVICE).await?;
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
        let api_flags: Vec<(&'static str, String)> = [
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
        .collect();
        let mut api = ServiceProcess::spawn(
            "vaas-api",
            service_command(&binaries.api, &api_flags),
            &dir.path().join("api-1.log"),
        )?;
        wait_serving(&mut api, api_port, tls.as_ref(), "").await?;
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
            agent_flags: self.agent_flags,
            api_flags,
            api_starts: 1,
            server_ids: vec![None; self.agents],
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
    /// Extra flags of every agent (from [`SystemBuilder::split_vcl`]).
    agent_flags: Vec<(&'static str, String)>,
    api_flags: Vec<(&'static str, String)>,
    api_starts: usize,
    /// The server each varnishd is registered as, once it is.
    server_ids: Vec<Option<i64>>,
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
    /// Returns the URL of the system's store (for benchmarks that measure the database itself).
    pub fn database_url(&self) -> &str {
        self.api_flags
            .iter()
            .find(|(flag, _)| *flag == "--database-url")
            .map_or("", |(_, url)| url.as_str())
    }

    /// Returns a builder for a system on `store`.
    pub fn builder(store: StoreKind) -> SystemBuilder {
        SystemBuilder {
            store,
            agents: 1,
            schedulers: 1,
            tls: false,
            agent_flags: Vec::new(),
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

    /// Returns a StatusService client calling with the admin token.
    pub fn status(&self) -> StatusServiceClient<Authed> {
        StatusServiceClient::with_interceptor(
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

    /// Registers varnishd `index` as an active server of the cluster in datacenter `dc_id` with
    /// template `template_id`, as an operator brings in a new server: in maintenance first, then
    /// its agent (whose token needs a registered server), then active; fails unless its reload
    /// succeeded before the activation answered. Returns the server's id.
    pub async fn add_server(
        &mut self,
        index: usize,
        dc_id: i64,
        template_id: i64,
        cluster_id: i64,
    ) -> Result<i64> {
        let varnishd = self.varnishd(index);
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
        let server = self
            .config()
            .create_varnish_server(create)
            .await?
            .into_inner()
            .varnish_server
            .context("server")?;
        let server_id = server.id;
        self.attach_agent(index, server_id).await?;
        let activated = self
            .config()
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
        Ok(server_id)
    }

    /// Creates director `name` of the set-up cluster, routed by path with `route_expression`,
    /// with one backend pointing at `origin`; returns both as stored.
    pub async fn create_director_with_backend(
        &self,
        setup: &Setup,
        name: &str,
        route_expression: &str,
        origin: SocketAddr,
    ) -> Result<(Director, Backend)> {
        let director = self
            .config()
            .create_director(CreateDirectorRequest {
                director: Some(Director {
                    name: name.into(),
                    cluster_ids: vec![setup.cluster_id],
                    route_expression: route_expression.into(),
                    ..Default::default()
                }),
            })
            .await?
            .into_inner()
            .director
            .context("director")?;
        let backend = self
            .config()
            .create_backend(CreateBackendRequest {
                backend: Some(Backend {
                    director_id: director.id,
                    ..backend_for(setup, origin)
                }),
            })
            .await?
            .into_inner()
            .backend
            .context("backend")?;
        Ok((director, backend))
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

    /// Times `rounds` synchronous writes of backend `id`, each setting another connection limit
    /// (from `first_limit` on), so each produces a VCL never loaded before (flipping back and
    /// forth would reuse the VCLs the agent keeps loaded); returns how long each took to answer,
    /// which is until the reload is active on every server. A partial update: only the id and
    /// the changed field travel.
    pub async fn time_backend_updates(
        &self,
        id: i64,
        first_limit: u32,
        rounds: usize,
    ) -> Result<Vec<Duration>> {
        let mut answers = Vec::with_capacity(rounds);
        for round in 0..rounds {
            let started = std::time::Instant::now();
            self.config()
                .update_backend(connection_limit_update(id, first_limit + round as u32))
                .await?;
            answers.push(started.elapsed());
        }
        Ok(answers)
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
    /// waits until it leads and every agent re-attached (reported to it).
    pub async fn restart_scheduler(&mut self, index: usize) -> Result<()> {
        let single = self.schedulers.len() == 1;
        let seen_before = self.agents_seen().await?;
        let replica = &mut self.schedulers[index];
        replica.process.stop();
        replica.starts += 1;
        replica.process = start_scheduler(
            &self.binaries,
            &replica.flags,
            self._dir.path(),
            index,
            replica.starts,
            self.tls.as_ref(),
            replica.port,
        )
        .await?;
        replica.stopped = false;
        if single {
            self.wait_until_leading(index).await?;
            for (agent_index, seen) in seen_before {
                self.wait_agent_reported(agent_index, seen).await?;
            }
        }
        Ok(())
    }

    /// Waits until scheduler replica `index` leads: its `vaas.v1.AgentService` health is
    /// SERVING (a standby answers NOT_SERVING).
    pub async fn wait_until_leading(&mut self, index: usize) -> Result<()> {
        let replica = &mut self.schedulers[index];
        wait_serving(
            &mut replica.process,
            replica.port,
            self.tls.as_ref(),
            LEADER_SERVICE,
        )
        .await
    }

    /// Kills scheduler replica `index` at once (SIGKILL), as a crash would; its lease stays
    /// until it expires.
    pub fn kill_scheduler(&mut self, index: usize) {
        self.schedulers[index].process.kill();
        self.schedulers[index].stopped = true;
    }

    /// Freezes scheduler replica `index` (SIGSTOP) until [`System::resume_scheduler`].
    pub fn pause_scheduler(&self, index: usize) {
        self.schedulers[index].process.pause();
    }

    /// Lets a paused scheduler replica run again.
    pub fn resume_scheduler(&self, index: usize) {
        self.schedulers[index].process.resume();
    }

    /// Returns the index of the replica that leads now, if one does (by gRPC health).
    pub async fn leader(&self) -> Option<usize> {
        for (index, replica) in self.schedulers.iter().enumerate() {
            if replica.stopped {
                continue;
            }
            if health_status(replica.port, self.tls.as_ref(), LEADER_SERVICE).await
                == Some(ServingStatus::Serving)
            {
                return Some(index);
            }
        }
        None
    }

    /// Kills the API at once (SIGKILL), as a crash would.
    pub fn kill_api(&mut self) {
        self.api.kill();
    }

    /// Starts the API again (after [`System::kill_api`]) with the same flags and port, and
    /// waits until it serves.
    pub async fn restart_api(&mut self) -> Result<()> {
        self.api.stop();
        self.api_starts += 1;
        self.api = ServiceProcess::spawn(
            "vaas-api",
            service_command(&self.binaries.api, &self.api_flags),
            &self
                ._dir
                .path()
                .join(format!("api-{}.log", self.api_starts)),
        )?;
        wait_serving(&mut self.api, self.api_port, self.tls.as_ref(), "").await
    }

    /// Kills the agent of varnishd `index` at once (SIGKILL), as a crash would.
    pub fn kill_agent(&mut self, index: usize) {
        if let Some(agent) = &mut self.agents[index] {
            agent.kill();
        }
    }

    /// Kills varnishd `index` (and whatever it runs) at once; [`System::restart_varnishd`]
    /// starts it again, empty.
    pub fn kill_varnishd(&mut self, index: usize) {
        self.varnishds[index].kill();
    }

    /// Returns, for every agent that runs and whose server is known, when the API last saw it
    /// report (`agentSeenTime`, microseconds).
    async fn agents_seen(&self) -> Result<Vec<(usize, i64)>> {
        let mut seen = Vec::new();
        for (index, server_id) in self.server_ids.iter().enumerate() {
            if let (Some(server_id), Some(_)) = (server_id, &self.agents[index]) {
                seen.push((index, self.agent_seen_micros(*server_id).await?));
            }
        }
        Ok(seen)
    }

    async fn agent_seen_micros(&self, server_id: i64) -> Result<i64> {
        let server = self.server(server_id).await?;
        Ok(server.agent_seen_time.map_or(0, |time| {
            time.seconds * 1_000_000 + i64::from(time.nanos) / 1_000
        }))
    }

    /// Waits until the agent of varnishd `index` reported to the leading scheduler after
    /// `seen_before` (microseconds): the API shows a newer `agentSeenTime` and the server is not
    /// DISCONNECTED.
    async fn wait_agent_reported(&mut self, index: usize, seen_before: i64) -> Result<()> {
        let server_id = self.server_ids[index].context("the varnishd is registered")?;
        let config = self.config();
        let agent = self.agents[index].as_mut().context("the agent runs")?;
        agent
            .wait_until("its server's report in the API", || {
                let mut config = config.clone();
                async move {
                    let Ok(response) = config
                        .get_varnish_server(GetVarnishServerRequest { id: server_id })
                        .await
                    else {
                        return false;
                    };
                    response.into_inner().varnish_server.is_some_and(|server| {
                        let seen = server.agent_seen_time.map_or(0, |time| {
                            time.seconds * 1_000_000 + i64::from(time.nanos) / 1_000
                        });
                        seen > seen_before && server.sync_state != SyncState::Disconnected as i32
                    })
                }
            })
            .await
    }

    /// Stops the agent of Varnish server `index`.
    pub fn stop_agent(&mut self, index: usize) {
        if let Some(agent) = &mut self.agents[index] {
            agent.stop();
        }
    }

    /// Starts the agent of varnishd `index` (again) with the token file written by
    /// [`System::attach_agent`] and waits until it attached: the API shows its report.
    pub async fn restart_agent(&mut self, index: usize) -> Result<()> {
        self.stop_agent(index);
        let server_id = self.server_ids[index]
            .context("restart_agent needs a registered server: call attach_agent first")?;
        let seen_before = self.agent_seen_micros(server_id).await?;
        self.agent_starts[index] += 1;
        let mut flags = agent_tls_flags(self.tls.as_ref());
        flags.extend(self.agent_flags.iter().cloned());
        let varnishd = &self.varnishds[index];
        let agent = start_agent(
            &self.binaries,
            &self.scheduler_urls,
            flags,
            AgentTarget {
                admin: varnishd.admin_addr(),
                secret_file: &varnishd.secret_file(),
                label: &format!("agent-{index}"),
            },
            self._dir.path(),
            self.agent_starts[index],
        )?;
        self.agents[index] = Some(agent);
        self.wait_agent_reported(index, seen_before).await
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
        std::fs::write(
            agent_token_file(self._dir.path(), &format!("agent-{index}")),
            secret,
        )?;
        self.server_ids[index] = Some(server_id);
        self.restart_agent(index).await
    }

    /// Starts a vaas-agent for registered server `server_id` that drives the admin endpoint
    /// `admin` (whose secret is in `secret_file`) instead of one of this system's varnishd, for
    /// benchmarks with many stand-in servers: creates the server's agent token through the API
    /// and returns the agent's process at once, before it attached.
    pub async fn spawn_agent_for(
        &self,
        server_id: i64,
        admin: SocketAddr,
        secret_file: &std::path::Path,
    ) -> Result<ServiceProcess> {
        let label = format!("agent-server-{server_id}");
        let secret = self
            .tokens()
            .create_token(CreateTokenRequest {
                name: label.clone(),
                role: Role::Agent as i32,
                varnish_server_id: server_id,
                ttl: None,
            })
            .await?
            .into_inner()
            .secret;
        std::fs::write(agent_token_file(self._dir.path(), &label), secret)?;
        let mut flags = agent_tls_flags(self.tls.as_ref());
        flags.extend(self.agent_flags.iter().cloned());
        start_agent(
            &self.binaries,
            &self.scheduler_urls,
            flags,
            AgentTarget {
                admin,
                secret_file,
                label: &label,
            },
            self._dir.path(),
            1,
        )
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

/// The gRPC health service name that only the leading scheduler replica reports SERVING.
const LEADER_SERVICE: &str = "vaas.v1.AgentService";

/// Returns the gRPC health of `service` ("" for the server as a whole) at 127.0.0.1:`port`, or
/// `None` when the server cannot be reached.
async fn health_status(port: u16, tls: Option<&TlsFiles>, service: &str) -> Option<ServingStatus> {
    let endpoint = Channel::from_shared(format!("{}://127.0.0.1:{port}", scheme(tls)))
        .ok()?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(2));
    let endpoint = match tls {
        Some(files) => endpoint.tls_config(client_tls(files, true).ok()?).ok()?,
        None => endpoint,
    };
    let channel = endpoint.connect().await.ok()?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .ok()?;
    Some(response.into_inner().status())
}

/// Waits until `process` answers gRPC health SERVING for `service` on `port`.
async fn wait_serving(
    process: &mut ServiceProcess,
    port: u16,
    tls: Option<&TlsFiles>,
    service: &str,
) -> Result<()> {
    let what = format!("gRPC health of {service:?} on port {port} is SERVING");
    process
        .wait_until(&what, || async move {
            health_status(port, tls, service).await == Some(ServingStatus::Serving)
        })
        .await
}

/// One scheduler replica and how to start it again.
struct SchedulerReplica {
    flags: Vec<(&'static str, String)>,
    port: u16,
    starts: usize,
    stopped: bool,
    process: ServiceProcess,
}

/// Starts scheduler replica `index` (its `run`-th start, for the log file's name) and waits
/// until its gRPC server answers health checks.
async fn start_scheduler(
    binaries: &Binaries,
    flags: &[(&str, String)],
    dir: &std::path::Path,
    index: usize,
    run: usize,
    tls: Option<&TlsFiles>,
    port: u16,
) -> Result<ServiceProcess> {
    let mut scheduler = ServiceProcess::spawn(
        &format!("vaas-scheduler-{index}"),
        service_command(&binaries.scheduler, flags),
        &dir.join(format!("scheduler-{index}-{run}.log")),
    )?;
    wait_serving(&mut scheduler, port, tls, "").await?;
    Ok(scheduler)
}

/// The admin endpoint an agent drives, and the name of its files.
struct AgentTarget<'a> {
    /// varnishd's admin address (or a stand-in's).
    admin: SocketAddr,
    /// The secret file of that endpoint.
    secret_file: &'a std::path::Path,
    /// Names the agent's token file, state directory and logs ("agent-0").
    label: &'a str,
}

/// Starts an agent for `target` with the token file of its label.
fn start_agent(
    binaries: &Binaries,
    scheduler_urls: &str,
    mut flags: Vec<(&'static str, String)>,
    target: AgentTarget<'_>,
    dir: &std::path::Path,
    run: usize,
) -> Result<ServiceProcess> {
    let label = target.label;
    flags.extend([
        ("--scheduler-url", scheduler_urls.to_owned()),
        (
            "--token-file",
            agent_token_file(dir, label).display().to_string(),
        ),
        ("--varnish-admin", target.admin.to_string()),
        (
            "--varnish-secret-file",
            target.secret_file.display().to_string(),
        ),
        ("--server-address", "127.0.0.1".to_owned()),
        (
            "--state-dir",
            dir.join(format!("{label}-state")).display().to_string(),
        ),
    ]);
    ServiceProcess::spawn(
        &format!("vaas-{label}"),
        service_command(&binaries.agent, &flags),
        &dir.join(format!("{label}-{run}.log")),
    )
}

/// Returns where the token of the agent labelled `label` is kept.
fn agent_token_file(dir: &std::path::Path, label: &str) -> PathBuf {
    dir.join(format!("{label}.token"))
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

/// Finds the binaries once per test process and returns them. A benchmark (built without debug
/// assertions, one process) first builds the release binaries itself, so that `cargo bench`
/// stays one command.
fn binaries() -> Result<Binaries> {
    if !cfg!(debug_assertions) {
        static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
        BUILT
            .get_or_init(|| build_release_binaries().map_err(|error| format!("{error:#}")))
            .clone()
            .map_err(|error| anyhow!(error))?;
    }
    static FOUND: OnceLock<Result<Binaries, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| find_binaries().map_err(|error| format!("{error:#}")))
        .clone()
        .map_err(|error| anyhow!(error))
}

/// Where a fresh build of the binaries is made (and what to run when they are missing or stale).
const BUILD_COMMAND: &str = "cargo build --workspace --bins";

/// Returns the binaries of the profile this test executable was built with (release for
/// benchmarks), from `VAAS_BIN_DIR` when set, else from the target directory beside the test
/// executable (`target/<profile>/deps/<test>` → `target/<profile>`). Fails when one is missing or
/// older than a source file of the workspace: a test must never run stale binaries.
fn find_binaries() -> Result<Binaries> {
    let directory = match std::env::var_os("VAAS_BIN_DIR") {
        Some(directory) => PathBuf::from(directory),
        None => {
            let executable = std::env::current_exe().context("cannot find the test executable")?;
            executable
                .parent()
                .and_then(std::path::Path::parent)
                .context("the test executable is not in a cargo target directory")?
                .to_owned()
        }
    };
    let release = if cfg!(debug_assertions) {
        ""
    } else {
        " --release"
    };
    let binaries = Binaries {
        api: directory.join("vaas-api"),
        scheduler: directory.join("vaas-scheduler"),
        agent: directory.join("vaas-agent"),
    };
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("tests/ has a parent")?
        .to_owned();
    let crates = workspace_crates(&workspace)?;
    for (binary, package) in [
        (&binaries.api, "vaas-api"),
        (&binaries.scheduler, "vaas-scheduler"),
        (&binaries.agent, "vaas-agent"),
    ] {
        let built = std::fs::metadata(binary)
            .and_then(|metadata| metadata.modified())
            .with_context(|| {
                format!(
                    "{} is missing: run `{BUILD_COMMAND}{release}` first (deploy/test.sh does)",
                    binary.display()
                )
            })?;
        let mut roots = crate_closure(&crates, package);
        roots.push(workspace.join("Cargo.lock"));
        if let Some((source, modified)) = newest_modification(&roots)
            && built < modified
        {
            return Err(anyhow!(
                "{} is older than {}: run `{BUILD_COMMAND}{release}` first (deploy/test.sh does)",
                binary.display(),
                source.display()
            ));
        }
    }
    Ok(binaries)
}

/// Builds the release binaries (incrementally) for a benchmark.
fn build_release_binaries() -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = Command::new(cargo)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .args(["build", "--quiet", "--release", "--workspace", "--bins"])
        .output()
        .context("cannot run cargo build for the VaaS binaries")?;
    ensure!(
        output.status.success(),
        "cargo build of the VaaS binaries failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// Returns our crates (`vaas-*`) by name: their directory and the `vaas-*` crates they depend on
/// (not counting dev-dependencies), read from the workspace's and each crate's `Cargo.toml`.
fn workspace_crates(
    workspace: &std::path::Path,
) -> Result<std::collections::BTreeMap<String, (PathBuf, Vec<String>)>> {
    let root = std::fs::read_to_string(workspace.join("Cargo.toml"))?;
    let mut crates = std::collections::BTreeMap::new();
    for line in root.lines() {
        let Some((name, rest)) = line.split_once(" = { path = \"") else {
            continue;
        };
        let (Some(path), true) = (rest.split('"').next(), name.starts_with("vaas-")) else {
            continue;
        };
        let directory = workspace.join(path);
        let manifest = std::fs::read_to_string(directory.join("Cargo.toml"))?;
        let mut dependencies = Vec::new();
        let mut section = "";
        for line in manifest.lines() {
            if line.starts_with('[') {
                section = line;
            } else if section == "[dependencies]"
                && let Some(dependency) = line.strip_suffix(".workspace = true")
                && dependency.starts_with("vaas-")
            {
                dependencies.push(dependency.to_owned());
            }
        }
        crates.insert(name.to_owned(), (directory, dependencies));
    }
    Ok(crates)
}

/// Returns the directories of `package` and of every crate of ours it depends on.
fn crate_closure(
    crates: &std::collections::BTreeMap<String, (PathBuf, Vec<String>)>,
    package: &str,
) -> Vec<PathBuf> {
    let mut seen = std::collections::BTreeSet::new();
    let mut pending = vec![package.to_owned()];
    let mut directories = Vec::new();
    while let Some(name) = pending.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        if let Some((directory, dependencies)) = crates.get(&name) {
            directories.push(directory.clone());
            pending.extend(dependencies.iter().cloned());
        }
    }
    directories
}

/// Returns the most recently modified file under `roots`, skipping `target`, `tests` and
/// `benches` directories (which no binary is built from).
fn newest_modification(roots: &[PathBuf]) -> Option<(PathBuf, std::time::SystemTime)> {
    let mut newest: Option<(PathBuf, std::time::SystemTime)> = None;
    let mut pending: Vec<PathBuf> = roots.to_vec();
    while let Some(path) = pending.pop() {
        let Ok(metadata) = std::fs::metadata(&path) else {
            continue;
        };
        if metadata.is_dir() {
            if path
                .file_name()
                .is_some_and(|name| name == "target" || name == "tests" || name == "benches")
            {
                continue;
            }
            if let Ok(entries) = std::fs::read_dir(&path) {
                pending.extend(entries.flatten().map(|entry| entry.path()));
            }
            continue;
        }
        if let Ok(modified) = metadata.modified()
            && newest.as_ref().is_none_or(|(_, time)| modified > *time)
        {
            newest = Some((path, modified));
        }
    }
    newest
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
    /// Creates, through the API, a dc "local", a cluster "demo" and a `<VCL/>` template; returns
    /// their ids (dc, cluster, template).
    pub async fn create_cluster_base(&self) -> Result<(i64, i64, i64)> {
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
        Ok((dc_id, cluster_id, template_id))
    }

    /// Creates, through the API, a dc, a cluster, a `<VCL/>` template, the first varnishd as a
    /// server with its agent, and a director "demo" routed by "^/"; checks that the server got
    /// its VCL. The server is registered in maintenance, gets its agent (whose token needs a
    /// registered server), and is then activated, as an operator brings in a new server.
    pub async fn set_up(&mut self) -> Result<Setup> {
        let mut config = self.config();
        let (dc_id, cluster_id, template_id) = self.create_cluster_base().await?;
        let server_id = self.add_server(0, dc_id, template_id, cluster_id).await?;
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

/// Returns the partial update that sets backend `id`'s connection limit to `limit`: a change
/// that gives its cluster a VCL never loaded before, as benchmarks need.
pub fn connection_limit_update(id: i64, limit: u32) -> UpdateBackendRequest {
    UpdateBackendRequest {
        backend: Some(Backend {
            id,
            max_connections: Some(limit),
            ..Backend::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["max_connections".to_owned()],
        }),
    }
}

/// Returns the sample at `fraction` (0.5: the median) of `samples`, which it sorts.
pub fn percentile(samples: &mut [Duration], fraction: f64) -> Duration {
    samples.sort();
    let index = ((samples.len() as f64 - 1.0) * fraction).round() as usize;
    samples[index]
}

/// Returns `duration` in milliseconds.
pub fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Returns the field names of the BadRequest violations of an error status.
pub fn violated_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_details_bad_request()
        .map(|bad_request| {
            bad_request
                .field_violations
                .into_iter()
                .map(|violation| violation.field)
                .collect()
        })
        .unwrap_or_default()
}

/// Asserts an INVALID_ARGUMENT whose only violation is `field` and whose message names each of
/// `needles`.
pub fn assert_invalid_argument(status: &tonic::Status, field: &str, needles: &[&str]) {
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert_eq!(violated_fields(status), [field], "{status:?}");
    for needle in needles {
        assert!(
            status.message().contains(needle),
            "{needle:?} in {status:?}"
        );
    }
}

/// A route condition: `left operator "value"` (`header` for ROUTE_LEFT_HEADER, else empty).
pub fn route_condition(
    left: RouteLeft,
    header: &str,
    operator: RouteOperator,
    value: &str,
) -> RouteCondition {
    RouteCondition {
        left: left as i32,
        header: header.into(),
        operator: operator as i32,
        value: value.into(),
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

/// Returns an active server of the set-up cluster whose agent never attaches (a free admin port
/// no varnishd listens on): every reload it takes part in fails for it.
pub fn silent_server(setup: &Setup) -> VarnishServer {
    VarnishServer {
        address: "127.0.0.1".into(),
        admin_port: Some(u32::from(free_port())),
        http_port: Some(80),
        status: ServerStatus::Active as i32,
        dc_id: setup.dc_id,
        template_id: setup.template_id,
        cluster_id: setup.cluster_id,
        ..Default::default()
    }
}
