//! Security, as an attacker would try it: every call needs the right credential (API tokens with
//! roles, agent tokens bound to one server), and configuration that reads files or runs code on a
//! Varnish host is refused by the API and cannot be turned on through the deploy's varnishd.

use anyhow::{Context, Result};
use tonic::Code;
use tonic_types::StatusExt;
use vaas_agent::varnish_cli::{CliError, CliTimeouts, VarnishCli};
use vaas_proto::v1::agent_service_client::AgentServiceClient;
use vaas_proto::v1::{
    AccessToken, AgentHello, AttachRequest, CreateBackendRequest, CreateDcRequest,
    CreateTokenRequest, CreateVarnishServerRequest, Dc, GetVclTemplateRequest,
    ListAuditEntriesRequest, ListDcsRequest, ListTokensRequest, RevokeTokenRequest, Role,
    ServerStatus, UpdateVarnishServerRequest, UpdateVclTemplateRequest, VarnishServer, VclTemplate,
    attach_request,
};
use vaas_testkit::{Varnishd, free_port};
use vaas_tests::{Bearer, StoreKind, System, on_both_stores};

on_both_stores!(a_template_that_reads_files_or_runs_code_is_refused_and_nothing_is_saved);

async fn a_template_that_reads_files_or_runs_code_is_refused_and_nothing_is_saved(
    store: StoreKind,
) -> Result<()> {
    let mut system = System::builder(store).start().await?;
    let setup = system.set_up().await?;
    for (content, line, what) in [
        (
            "<VCL/>\ninclude \"/etc/varnish/secret\";\n",
            2,
            "include reads a file",
        ),
        (
            "<VCL/>\nsub vcl_recv {\n  set req.http.x = std.fileread(\"/etc/passwd\");\n}\n",
            3,
            "std.fileread reads a file",
        ),
        (
            "<VCL/>\nsub vcl_init {\n  C{ system(\"id\"); }C\n}\n",
            3,
            "inline C runs code",
        ),
        ("<VCL/>\nimport x from \"/tmp/x.so\";\n", 2, "import … from"),
    ] {
        let status = system
            .config()
            .update_vcl_template(UpdateVclTemplateRequest {
                vcl_template: Some(VclTemplate {
                    id: setup.template_id,
                    name: "default".into(),
                    content: content.into(),
                    ..Default::default()
                }),
                update_mask: None,
            })
            .await
            .expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}");
        let violations = status
            .get_details_bad_request()
            .context("field violations")?
            .field_violations;
        assert_eq!(violations[0].field, "vcl_template.content");
        assert!(
            violations[0]
                .description
                .starts_with(&format!("line {line}: {what}")),
            "{}",
            violations[0].description
        );
    }
    assert_eq!(
        template_content(&system, setup.template_id).await?,
        "<VCL/>",
        "nothing was saved"
    );
    system.ensure_running()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deploys_varnishd_keeps_inline_c_off_and_refuses_absolute_includes() -> Result<()> {
    // The test kit starts varnishd with deploy/varnishd.params, as deploy/start.sh does.
    let varnishd = Varnishd::start().await?;
    let secret = std::fs::read(varnishd.secret_file())?;
    let mut cli =
        VarnishCli::connect(varnishd.admin_addr(), &secret, CliTimeouts::default()).await?;

    let turned_on = cli.raw(&["param.set", "vcc_allow_inline_c", "on"]).await?;
    assert_ne!(turned_on.status.code(), 200, "{turned_on:?}");
    assert!(turned_on.body.contains("protected"), "{}", turned_on.body);
    let unsafe_path = cli.raw(&["param.set", "vcc_unsafe_path", "on"]).await?;
    assert_ne!(unsafe_path.status.code(), 200, "{unsafe_path:?}");

    // An absolute include does not compile, and the compiler does not echo the file.
    let vcl = "vcl 4.1;\nbackend b none;\ninclude \"/etc/passwd\";\n";
    match cli.vcl_inline("probe_include", vcl).await {
        Err(CliError::Command { body, .. }) => assert!(!body.contains("root:"), "{body}"),
        other => panic!("an absolute include must not compile: {other:?}"),
    }
    let inline_c = "vcl 4.1;\nbackend b none;\nC{ int x; }C\n";
    assert!(
        matches!(
            cli.vcl_inline("probe_c", inline_c).await,
            Err(CliError::Command { .. })
        ),
        "inline C must not compile"
    );
    Ok(())
}

/// A watch whose caller went away releases its NATS subscription at once (3,000 cancelled watches
/// used to keep 3,000 subscriptions until their task changed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_that_leave_release_their_subscriptions() -> Result<()> {
    use std::time::Duration;
    use tokio::time::Instant;
    use vaas_proto::v1::{CreateBackendRequest, WatchTaskRequest};

    let mut system = System::builder(StoreKind::Sqlite).start().await?;
    let setup = system.set_up().await?;
    // Without a scheduler the task stays PENDING, so every watch stays open.
    system.stop_scheduler(0);
    let request = vaas_tests::respond_async(CreateBackendRequest {
        backend: Some(vaas_tests::backend_for(
            &setup,
            "127.0.0.1:9".parse().context("address")?,
        )),
    });
    let task = system
        .config()
        .create_backend(request)
        .await?
        .into_inner()
        .tasks[0]
        .id;
    let baseline = system.nats_subscriptions().await?;

    let mut watches = Vec::new();
    for _ in 0..50 {
        let mut watch = system
            .tasks()
            .watch_task(WatchTaskRequest { id: task })
            .await?
            .into_inner();
        // The first answer comes after the watch subscribed.
        watch.message().await?.context("a first answer")?;
        watches.push(watch);
    }
    let watching = system.nats_subscriptions().await?;
    assert!(
        watching >= baseline + 50,
        "{watching} subscriptions while watching"
    );

    drop(watches);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = system.nats_subscriptions().await?;
        if left <= baseline {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} subscriptions 10 s after the watchers left (baseline {baseline})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await; // polling the monitor endpoint
    }
    Ok(())
}

/// The agent reports at attach what makes its varnishd unsafe, and its compiler command, and the
/// API shows both per server. The test kit's varnishd runs the deploy's parameters except that
/// `cc_command` stays writable (the reload benchmark changes it), so exactly that is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_server_shows_what_makes_its_varnishd_unsafe_and_how_it_compiles() -> Result<()> {
    let mut system = System::builder(StoreKind::Sqlite).start().await?;
    let setup = system.set_up().await?;
    let server = system.server(setup.server_id).await?;
    assert_eq!(
        server.unsafe_settings,
        ["cc_command is not read-only (start varnishd with -r cc_command)"]
    );
    assert_eq!(server.cc_command, vaas_testkit::deploy_cc_command());
    system.ensure_running()
}

/// Returns a template's content as the API serves it.
async fn template_content(system: &System, id: i64) -> Result<String> {
    Ok(system
        .config()
        .get_vcl_template(GetVclTemplateRequest { id })
        .await?
        .into_inner()
        .vcl_template
        .context("template")?
        .content)
}

/// Creates a token through the API as the admin and returns it with its secret.
async fn token(
    system: &System,
    name: &str,
    role: Role,
    varnish_server_id: i64,
    ttl_seconds: Option<i64>,
) -> Result<(AccessToken, String)> {
    let created = system
        .tokens()
        .create_token(CreateTokenRequest {
            name: name.into(),
            role: role as i32,
            varnish_server_id,
            ttl: ttl_seconds.map(|seconds| prost_types::Duration { seconds, nanos: 0 }),
        })
        .await?
        .into_inner();
    Ok((created.token.context("token")?, created.secret))
}

fn new_dc(name: &str) -> CreateDcRequest {
    CreateDcRequest {
        dc: Some(Dc {
            id: 0,
            name: name.into(),
            symbol: name.to_lowercase(),
        }),
    }
}

/// Asserts that a call was refused with `code` and a message containing `words`.
fn assert_refused(status: &tonic::Status, code: Code, words: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(words), "{}", status.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_need_a_valid_token_and_each_role_reaches_only_its_share() -> Result<()> {
    let mut system = System::builder(StoreKind::Sqlite).start().await?;
    let setup = system.set_up().await?;

    // Health stays open (load balancers call it without a credential).
    let mut health = tonic_health::pb::health_client::HealthClient::new(system.channel());
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await?;

    let status = system
        .config_as(None)
        .list_dcs(ListDcsRequest::default())
        .await
        .expect_err("a call without a token");
    assert_refused(&status, Code::Unauthenticated, "needs a token");
    let status = system
        .config_as(Some("vaas_0123456789"))
        .list_dcs(ListDcsRequest::default())
        .await
        .expect_err("a call with a made-up token");
    assert_refused(&status, Code::Unauthenticated, "not valid");

    let (reader, reader_secret) = token(&system, "reader-1", Role::Reader, 0, None).await?;
    let dcs = system
        .config_as(Some(&reader_secret))
        .list_dcs(ListDcsRequest::default())
        .await?
        .into_inner()
        .dcs;
    assert_eq!(dcs.len(), 1, "a reader reads");
    let status = system
        .config_as(Some(&reader_secret))
        .create_dc(new_dc("Second"))
        .await
        .expect_err("a reader's write");
    assert_refused(&status, Code::PermissionDenied, "has role reader");

    let (_, editor_secret) = token(&system, "editor-1", Role::Editor, 0, None).await?;
    let status = system
        .config_as(Some(&editor_secret))
        .update_vcl_template(UpdateVclTemplateRequest {
            vcl_template: Some(VclTemplate {
                id: setup.template_id,
                name: "default".into(),
                content: "<VCL/>\n# changed by an editor\n".into(),
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .expect_err("an editor's template change");
    assert_refused(&status, Code::PermissionDenied, "needs admin");
    let status = system
        .tokens_as(Some(&editor_secret))
        .create_token(CreateTokenRequest {
            name: "escalated".into(),
            role: Role::Admin as i32,
            ..Default::default()
        })
        .await
        .expect_err("an editor making an admin token");
    assert_refused(&status, Code::PermissionDenied, "needs admin");
    let created = system
        .config_as(Some(&editor_secret))
        .create_dc(new_dc("Second"))
        .await?
        .into_inner()
        .dc
        .context("dc")?;
    let history = system
        .config()
        .list_audit_entries(ListAuditEntriesRequest {
            resource: format!("dcs/{}", created.id),
            ..Default::default()
        })
        .await?
        .into_inner()
        .audit_entries;
    assert_eq!(
        history[0].actor, "editor-1",
        "the caller's identity is audited"
    );

    let (_, short_secret) = token(&system, "short-lived", Role::Reader, 0, Some(1)).await?;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await; // past its lifetime
    let status = system
        .config_as(Some(&short_secret))
        .list_dcs(ListDcsRequest::default())
        .await
        .expect_err("an expired token");
    assert_refused(&status, Code::Unauthenticated, "expired");

    system
        .tokens()
        .revoke_token(RevokeTokenRequest { id: reader.id })
        .await?;
    let status = system
        .config_as(Some(&reader_secret))
        .list_dcs(ListDcsRequest::default())
        .await
        .expect_err("a revoked token");
    assert_refused(&status, Code::Unauthenticated, "revoked");

    assert_eq!(
        template_content(&system, setup.template_id).await?,
        "<VCL/>",
        "the refused change saved nothing"
    );
    let listed = system
        .tokens()
        .list_tokens(ListTokensRequest::default())
        .await?
        .into_inner()
        .tokens;
    assert!(
        listed.iter().all(|token| token.name != "escalated"),
        "{listed:?}"
    );
    system.ensure_running()
}

/// Sends a hello naming `address` and `admin_port` to the scheduler with `token` (or none) and
/// returns how the attach ended.
async fn attach_as(
    system: &System,
    token: Option<&str>,
    address: &str,
    admin_port: u32,
) -> Result<Result<(), tonic::Status>> {
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", system.scheduler_addr(0)))?
            .connect()
            .await?;
    let mut client = AgentServiceClient::with_interceptor(channel, Bearer::new(token));
    let hello = AttachRequest {
        message: Some(attach_request::Message::Hello(AgentHello {
            address: address.into(),
            admin_port,
            hostname: "intruder".into(),
            ..Default::default()
        })),
    };
    Ok(client
        .attach(futures::stream::iter([hello]))
        .await
        .map(|_| ()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_token_attaches_only_as_its_own_server_and_calls_no_api() -> Result<()> {
    let mut system = System::builder(StoreKind::Sqlite).start().await?;
    // Server A with its real agent, attached with A's token.
    let setup = system.set_up().await?;
    let server_a = system.server(setup.server_id).await?;
    let request = vaas_tests::respond_async(CreateVarnishServerRequest {
        varnish_server: Some(VarnishServer {
            id: 0,
            admin_port: Some(u32::from(free_port())),
            status: ServerStatus::Maintenance as i32,
            ..server_a.clone()
        }),
    });
    let server_b = system
        .config()
        .create_varnish_server(request)
        .await?
        .into_inner()
        .varnish_server
        .context("server b")?;
    let b_port = server_b.admin_port.context("admin port")?;
    let (_, secret_a) = token(&system, "stolen-a", Role::Agent, server_a.id, None).await?;

    let refused = attach_as(&system, None, "127.0.0.1", b_port)
        .await?
        .expect_err("an attach without a token");
    assert_refused(&refused, Code::Unauthenticated, "token");
    let refused = attach_as(&system, Some(&secret_a), "127.0.0.1", b_port)
        .await?
        .expect_err("A's token posing as B");
    assert_refused(&refused, Code::PermissionDenied, "cannot attach as");
    let refused = attach_as(&system, Some(system.admin_token()), "127.0.0.1", b_port)
        .await?
        .expect_err("an admin token is no agent token");
    assert_refused(&refused, Code::PermissionDenied, "not an agent token");

    // A disabled server's agent is refused even with the right token.
    let (_, secret_b) = token(&system, "agent-b", Role::Agent, server_b.id, None).await?;
    system
        .config()
        .update_varnish_server(UpdateVarnishServerRequest {
            varnish_server: Some(VarnishServer {
                status: ServerStatus::Disabled as i32,
                ..server_b
            }),
            update_mask: None,
        })
        .await?;
    let refused = attach_as(&system, Some(&secret_b), "127.0.0.1", b_port)
        .await?
        .expect_err("a disabled server's agent");
    assert_refused(&refused, Code::PermissionDenied, "disabled");

    // An agent token opens nothing on the API.
    let status = system
        .config_as(Some(&secret_a))
        .list_dcs(ListDcsRequest::default())
        .await
        .expect_err("an agent token on the API");
    assert_refused(&status, Code::PermissionDenied, "has role agent");

    // The refusals left the real agent of A alone: it still reloads.
    let origin = vaas_testkit::HttpOrigin::start("origin").await?;
    system
        .config()
        .create_backend(CreateBackendRequest {
            backend: Some(vaas_tests::backend_for(&setup, origin.addr())),
        })
        .await?;
    let page = vaas_testkit::http_get(system.varnishd(0).http_addr(), "/", "localhost").await?;
    assert_eq!(page.status, 200, "{}", page.body);

    // Revoking the real agent's token detaches it (within the 15 s recheck), and it cannot
    // come back: the server's next change fails for want of an agent.
    let agent_token = system
        .tokens()
        .list_tokens(ListTokensRequest::default())
        .await?
        .into_inner()
        .tokens
        .into_iter()
        .find(|token| {
            token.role == Role::Agent as i32
                && token.varnish_server_id == server_a.id
                && token.name != "stolen-a"
        })
        .context("the real agent's token")?;
    system
        .tokens()
        .revoke_token(RevokeTokenRequest { id: agent_token.id })
        .await?;
    system
        .wait_for_scheduler_log("agent token withdrawn")
        .await?;
    let other_origin = vaas_testkit::HttpOrigin::start("other-origin").await?;
    let status = system
        .config()
        .create_backend(CreateBackendRequest {
            backend: Some(vaas_tests::backend_for(&setup, other_origin.addr())),
        })
        .await
        .expect_err("a change with the only agent cut off");
    assert_refused(&status, Code::FailedPrecondition, "no agent is attached");
    Ok(())
}
