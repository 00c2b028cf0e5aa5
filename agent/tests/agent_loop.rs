//! The agent loop against an in-process stub of the scheduler's AgentService and a real varnishd.

#[path = "../vcl/tests/fixtures/mod.rs"]
mod fixtures;
mod support;

use std::time::Duration;

use support::{Varnishd, http_get};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use vaas_agent::varnish_cli::ChildState;
use vaas_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use vaas_proto::v1::{
    AbortCommand, AbortResult, AgentHello, AttachRequest, AttachResponse, ClusterSnapshot,
    CommitCommand, CommitResult, PrepareCommand, PrepareResult, attach_request, attach_response,
};

/// How long a test waits for the agent.
const WAIT: Duration = Duration::from_secs(60);

/// One attach stream as the stub scheduler sees it.
struct Session {
    hello: AgentHello,
    commands: mpsc::Sender<Result<AttachResponse, Status>>,
    results: Streaming<AttachRequest>,
}

/// Hands every attach stream to the test.
struct StubScheduler {
    sessions: mpsc::Sender<Session>,
}

#[tonic::async_trait]
impl AgentService for StubScheduler {
    type AttachStream = ReceiverStream<Result<AttachResponse, Status>>;

    async fn attach(
        &self,
        request: Request<Streaming<AttachRequest>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let mut results = request.into_inner();
        let (commands, commands_rx) = mpsc::channel(4);
        let sessions = self.sessions.clone();
        tokio::spawn(async move {
            let first = results.message().await;
            let Ok(Some(AttachRequest {
                message: Some(attach_request::Message::Hello(hello)),
            })) = first
            else {
                panic!("first message is not a hello: {first:?}");
            };
            let _ = sessions
                .send(Session {
                    hello,
                    commands,
                    results,
                })
                .await;
        });
        Ok(Response::new(ReceiverStream::new(commands_rx)))
    }
}

/// The stub scheduler, a varnishd and an agent between them.
struct Setup {
    varnishd: Varnishd,
    sessions: mpsc::Receiver<Session>,
    shutdown: CancellationToken,
    agent: JoinHandle<Result<(), vaas_agent::Error>>,
}

async fn setup() -> Setup {
    setup_with_state_dir(None).await
}

async fn setup_with_state_dir(state_dir: Option<std::path::PathBuf>) -> Setup {
    let varnishd = Varnishd::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let scheduler_addr = listener.local_addr().expect("addr");
    let (sessions_tx, sessions) = mpsc::channel(4);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServiceServer::new(StubScheduler {
                sessions: sessions_tx,
            }))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let mut config = vaas_agent::Config::new(
        format!("http://{scheduler_addr}"),
        varnishd.admin,
        &varnishd.secret_file,
    );
    config.server_address = "10.9.8.7".into();
    config.server_admin_port = 6082;
    config.hostname = "cache-test".into();
    config.max_backoff = Duration::from_millis(500);
    config.state_dir = state_dir;
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(vaas_agent::run(config, shutdown.clone()));
    Setup {
        varnishd,
        sessions,
        shutdown,
        agent,
    }
}

impl Setup {
    async fn next_session(&mut self) -> Session {
        tokio::time::timeout(WAIT, self.sessions.recv())
            .await
            .expect("agent attached in time")
            .expect("scheduler running")
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let outcome = tokio::time::timeout(WAIT, self.agent)
            .await
            .expect("agent stopped in time")
            .expect("agent task");
        assert!(outcome.is_ok(), "{outcome:?}");
    }

    /// Names of the VaaS VCLs loaded in varnishd, with their status and state. VCLs already
    /// discarded but still referenced (Varnish frees them once their last request is done) are
    /// left out.
    async fn vaas_vcls(&self) -> Vec<(String, String, String)> {
        let mut cli = self.varnishd.cli().await;
        cli.vcl_list()
            .await
            .expect("vcl.list")
            .into_iter()
            .filter(|vcl| vcl.name.starts_with("vaas-") && vcl.status != "discarded")
            .map(|vcl| (vcl.name, vcl.status, vcl.state))
            .collect()
    }
}

impl Session {
    async fn send(&self, command: attach_response::Command) {
        self.send_in_term(command, 1).await;
    }

    /// Sends a command as the scheduler leader of `term` would.
    async fn send_in_term(&self, command: attach_response::Command, term: i64) {
        self.commands
            .send(Ok(AttachResponse {
                command: Some(command),
                term,
            }))
            .await
            .expect("stream open");
    }

    async fn message(&mut self) -> attach_request::Message {
        tokio::time::timeout(WAIT, self.results.message())
            .await
            .expect("result in time")
            .expect("stream healthy")
            .expect("stream open")
            .message
            .expect("a message")
    }

    /// The next result; a prepare's progress report before it must name its reload.
    async fn result(&mut self) -> attach_request::Message {
        match self.message().await {
            attach_request::Message::PrepareProgress(progress) => {
                let result = self.message().await;
                let attach_request::Message::PrepareResult(prepared) = &result else {
                    panic!("a prepare result after progress, got {result:?}");
                };
                assert_eq!(progress.reload_id, prepared.reload_id);
                assert_eq!(progress.vcl_version, prepared.vcl_version);
                assert!(progress.render_duration.is_some());
                result
            }
            result => result,
        }
    }

    async fn prepare(&mut self, reload_id: &str, snapshot: ClusterSnapshot) -> PrepareResult {
        self.send(attach_response::Command::Prepare(PrepareCommand {
            reload_id: reload_id.into(),
            server_id: fixtures::SERVER_ID,
            snapshot: Some(snapshot),
        }))
        .await;
        match self.result().await {
            attach_request::Message::PrepareResult(result) => {
                assert_eq!(result.reload_id, reload_id);
                result
            }
            other => panic!("expected a prepare result, got {other:?}"),
        }
    }

    async fn commit(&mut self, reload_id: &str, vcl_name: &str) -> CommitResult {
        self.send(attach_response::Command::Commit(CommitCommand {
            reload_id: reload_id.into(),
            vcl_name: vcl_name.into(),
        }))
        .await;
        match self.result().await {
            attach_request::Message::CommitResult(result) => result,
            other => panic!("expected a commit result, got {other:?}"),
        }
    }

    /// Returns once the agent finished everything before this call, including the housekeeping
    /// it does after answering a commit (it handles one command at a time).
    async fn barrier(&mut self) {
        let answer = self.abort("barrier", "vaas-0000000000000000-0-0").await;
        assert!(answer.ok, "{answer:?}");
    }

    async fn abort(&mut self, reload_id: &str, vcl_name: &str) -> AbortResult {
        self.send(attach_response::Command::Abort(AbortCommand {
            reload_id: reload_id.into(),
            vcl_name: vcl_name.into(),
        }))
        .await;
        match self.result().await {
            attach_request::Message::AbortResult(result) => result,
            other => panic!("expected an abort result, got {other:?}"),
        }
    }
}

/// A snapshot whose only backend differs by `n`, so every `n` renders a different version.
fn variant(n: u8) -> ClusterSnapshot {
    fixtures::one_director(&format!("10.1.0.{n}"), 80)
}

#[tokio::test]
async fn prepare_commit_garbage_collection_and_reconnect() {
    let mut setup = setup().await;
    let mut session = setup.next_session().await;
    assert_eq!(session.hello.address, "10.9.8.7");
    assert_eq!(session.hello.admin_port, 6082);
    assert_eq!(session.hello.hostname, "cache-test");
    assert!(
        session.hello.varnish_version.starts_with("varnish-"),
        "{:?}",
        session.hello
    );
    assert_eq!(session.hello.active_vcl_name, "");
    assert!(!session.hello.agent_version.is_empty());

    // Prepare loads without activating.
    let prepared = session.prepare("r1", variant(1)).await;
    assert!(prepared.ok, "{prepared:?}");
    assert!(!prepared.unchanged);
    assert!(
        prepared
            .vcl_name
            .starts_with(&format!("vaas-{}-", prepared.vcl_version)),
        "{prepared:?}"
    );
    let load = prepared.load_duration.expect("load duration");
    assert!(load.seconds > 0 || load.nanos > 0);
    eprintln!(
        "prepare r1: render {:?}, load {:?}",
        prepared.render_duration, load
    );
    assert_eq!(
        setup.vaas_vcls().await,
        [(prepared.vcl_name.clone(), "available".into(), "auto".into())]
    );

    // Commit activates it and starts the stopped child.
    let committed = session.commit("r1", &prepared.vcl_name).await;
    assert!(committed.ok, "{committed:?}");
    assert_eq!(committed.active_vcl_version, prepared.vcl_version);
    let mut cli = setup.varnishd.cli().await;
    assert_eq!(cli.status().await.expect("status"), ChildState::Running);
    let served = http_get(setup.varnishd.http, "example.com", "/vaas_version").await;
    assert_eq!(served.body, prepared.vcl_version);

    // The same snapshot again is not loaded again.
    let unchanged = session.prepare("r2", variant(1)).await;
    assert!(unchanged.ok && unchanged.unchanged, "{unchanged:?}");
    assert_eq!(unchanged.vcl_name, prepared.vcl_name);
    assert!(unchanged.load_duration.is_none());
    // Aborting it must not touch the active VCL.
    let aborted = session.abort("r2", &unchanged.vcl_name).await;
    assert!(aborted.ok, "{aborted:?}");

    // Abort discards a prepared VCL; aborting it twice is fine.
    let discarded = session.prepare("r3", variant(2)).await;
    assert!(discarded.ok, "{discarded:?}");
    assert!(session.abort("r3", &discarded.vcl_name).await.ok);
    assert!(session.abort("r3", &discarded.vcl_name).await.ok);
    assert!(
        !setup
            .vaas_vcls()
            .await
            .iter()
            .any(|(name, ..)| *name == discarded.vcl_name)
    );

    // Garbage collection keeps the active VCL and the two newest others, cold.
    let mut names = vec![prepared.vcl_name.clone()];
    for n in 3..7 {
        let reload_id = format!("gc{n}");
        let result = session.prepare(&reload_id, variant(n)).await;
        assert!(result.ok, "{result:?}");
        assert!(session.commit(&reload_id, &result.vcl_name).await.ok);
        names.push(result.vcl_name);
    }
    session.barrier().await;
    let expected: Vec<(String, String, String)> = vec![
        (names[2].clone(), "available".into(), "cold".into()),
        (names[3].clone(), "available".into(), "cold".into()),
        (names[4].clone(), "active".into(), "auto".into()),
    ];
    assert_eq!(setup.vaas_vcls().await, expected);

    // A prepare of a version still loaded reuses it instead of compiling again.
    let reused = session.prepare("r4", variant(5)).await;
    assert!(reused.ok && !reused.unchanged, "{reused:?}");
    assert_eq!(reused.vcl_name, names[3]);
    let recommitted = session.commit("r4", &reused.vcl_name).await;
    assert!(recommitted.ok, "{recommitted:?}");

    // A prepared VCL cooled by the garbage collection of another commit can still be committed.
    let first = session.prepare("r5", variant(8)).await;
    let second = session.prepare("r6", variant(9)).await;
    assert!(session.commit("r6", &second.vcl_name).await.ok);
    session.barrier().await;
    let cooled = setup.vaas_vcls().await;
    assert!(
        cooled.contains(&(first.vcl_name.clone(), "available".into(), "cold".into())),
        "{cooled:?}"
    );
    let late = session.commit("r5", &first.vcl_name).await;
    assert!(late.ok, "{late:?}");

    // When the stream ends the agent attaches again and reports what is active.
    drop(session);
    let session = setup.next_session().await;
    assert_eq!(session.hello.active_vcl_name, first.vcl_name);
    assert_eq!(session.hello.active_vcl_version, first.vcl_version);

    setup.stop().await;
}

/// Fencing: once a command of a newer scheduler term came, an older leader's commands are
/// refused without touching varnishd.
#[tokio::test]
async fn commands_of_an_older_scheduler_term_are_refused() {
    let mut setup = setup().await;
    let mut session = setup.next_session().await;
    session
        .send_in_term(
            attach_response::Command::Prepare(PrepareCommand {
                reload_id: "new-leader".into(),
                server_id: fixtures::SERVER_ID,
                snapshot: Some(fixtures::one_director("10.1.0.1", 80)),
            }),
            7,
        )
        .await;
    let attach_request::Message::PrepareResult(prepared) = session.result().await else {
        panic!("a prepare result");
    };
    assert!(prepared.ok, "{prepared:?}");

    session
        .send_in_term(
            attach_response::Command::Commit(CommitCommand {
                reload_id: "old-leader".into(),
                vcl_name: prepared.vcl_name.clone(),
            }),
            6,
        )
        .await;
    let attach_request::Message::CommitResult(refused) = session.result().await else {
        panic!("a commit result");
    };
    assert!(!refused.ok);
    assert_eq!(refused.reload_id, "old-leader");
    assert!(
        refused.error.contains("older than term 7"),
        "{}",
        refused.error
    );
    assert!(
        setup
            .vaas_vcls()
            .await
            .iter()
            .all(|(_, status, _)| status != "active"),
        "the old leader's commit changed nothing"
    );
    setup.stop().await;
}

#[tokio::test]
async fn a_failing_template_gives_the_compiler_message() {
    let mut setup = setup().await;
    let mut session = setup.next_session().await;

    let mut snapshot = fixtures::one_director("10.1.0.1", 80);
    snapshot.templates[0].content = "<VCL/>\nsub vcl_recv {\n    set req.nothing = 1;\n}\n".into();
    let failed = session.prepare("bad", snapshot).await;
    assert!(!failed.ok, "{failed:?}");
    assert!(failed.error.contains("VCC-compiler"), "{}", failed.error);
    assert!(failed.error.contains("req.nothing"), "{}", failed.error);
    assert!(!failed.vcl_version.is_empty());
    eprintln!("failed prepare: load {:?}", failed.load_duration);
    assert!(setup.vaas_vcls().await.is_empty());

    // The scheduler aborts the reload; nothing was loaded, and that is fine.
    assert!(session.abort("bad", &failed.vcl_name).await.ok);

    // A render error (the server is not in the snapshot) is reported too.
    let mut missing = fixtures::empty_cluster();
    missing.servers.clear();
    let failed = session.prepare("missing", missing).await;
    assert!(!failed.ok);
    assert_eq!(
        failed.error,
        "render failed: server 100 is not in the snapshot"
    );

    // Committing a VCL that does not exist fails with varnishd's message.
    let commit = session.commit("ghost", "vaas-0000000000000000-1").await;
    assert!(!commit.ok);
    assert!(commit.error.contains("No VCL named"), "{}", commit.error);

    setup.stop().await;
}

#[tokio::test]
async fn an_empty_varnishd_gets_the_last_committed_vcl_back_without_a_scheduler() {
    let state = tempfile::tempdir().expect("tempdir");
    let mut setup = setup_with_state_dir(Some(state.path().to_owned())).await;
    let mut session = setup.next_session().await;
    let prepared = session.prepare("r1", variant(1)).await;
    assert!(prepared.ok, "{prepared:?}");
    assert!(session.commit("r1", &prepared.vcl_name).await.ok);
    setup.stop().await;

    // A varnishd that started empty (as after a restart with -f ''), and no scheduler to ask.
    let empty = Varnishd::start().await;
    let mut config = vaas_agent::Config::new("http://127.0.0.1:9", empty.admin, &empty.secret_file);
    config.state_dir = Some(state.path().to_owned());
    config.max_backoff = Duration::from_millis(500);
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(vaas_agent::run(config, shutdown.clone()));
    // The child may still be starting right after the restore: waits for both.
    wait_until_serving(&empty, &prepared.vcl_name).await;
    shutdown.cancel();
    let outcome = tokio::time::timeout(WAIT, agent)
        .await
        .expect("agent stopped");
    assert!(outcome.expect("agent task").is_ok());
}

/// How long a repair may take, from the fault to varnishd serving again.
const REPAIR_BOUND: Duration = Duration::from_secs(10);

/// Waits until varnishd runs `vcl_name` with its child running; returns how long it took.
async fn wait_until_serving(varnishd: &Varnishd, vcl_name: &str) -> Duration {
    let started = tokio::time::Instant::now();
    loop {
        let mut cli = varnishd.cli().await;
        let active = cli
            .vcl_list()
            .await
            .expect("vcl.list")
            .into_iter()
            .find(|vcl| vcl.is_active())
            .map(|vcl| vcl.name);
        let child = cli.status().await.expect("status");
        if active.as_deref() == Some(vcl_name) && child == ChildState::Running {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < REPAIR_BOUND,
            "not repaired within {REPAIR_BOUND:?}: active {active:?}, child {child:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_varnishd_restarted_under_a_running_agent_gets_the_last_good_vcl_back_by_itself() {
    // No state directory: the agent keeps the last good VCL in memory too.
    let mut setup = setup().await;
    let mut session = setup.next_session().await;
    let prepared = session.prepare("r1", variant(1)).await;
    assert!(prepared.ok, "{prepared:?}");
    assert!(session.commit("r1", &prepared.vcl_name).await.ok);

    // varnishd restarts empty (-f '') while the agent stays attached, and nobody sends a command.
    setup.varnishd.restart().await;
    let repaired_in = wait_until_serving(&setup.varnishd, &prepared.vcl_name).await;
    eprintln!("varnishd restarted: serving the last good vcl again {repaired_in:?} later");
    let served = http_get(setup.varnishd.http, "example.com", "/vaas_version").await;
    assert_eq!(served.body, prepared.vcl_version);

    // The agent attached again to tell the scheduler what varnishd runs now.
    let again = setup.next_session().await;
    assert_eq!(again.hello.active_vcl_name, prepared.vcl_name);
    assert_eq!(again.hello.active_vcl_version, prepared.vcl_version);
    drop(session);
    setup.stop().await;
}

#[tokio::test]
async fn a_stopped_child_is_started_and_another_active_vcl_is_reported() {
    let mut setup = setup().await;
    let mut session = setup.next_session().await;
    let prepared = session.prepare("r1", variant(1)).await;
    assert!(prepared.ok, "{prepared:?}");
    assert!(session.commit("r1", &prepared.vcl_name).await.ok);
    session.barrier().await;

    let mut cli = setup.varnishd.cli().await;
    cli.command(&["stop"]).await.expect("stop the child");
    wait_until_serving(&setup.varnishd, &prepared.vcl_name).await;
    let session = setup.next_session().await;
    assert_eq!(session.hello.active_vcl_name, prepared.vcl_name);

    // A VCL used by hand is left to the scheduler: the agent says hello again naming it.
    let mut cli = setup.varnishd.cli().await;
    cli.vcl_inline("by_hand", "vcl 4.1;\nbackend none_here none;\n")
        .await
        .expect("vcl.inline");
    cli.vcl_use("by_hand").await.expect("vcl.use");
    let told = setup.next_session().await;
    assert_eq!(told.hello.active_vcl_name, "by_hand");
    assert_eq!(told.hello.active_vcl_version, "");
    drop(session);
    setup.stop().await;
}
