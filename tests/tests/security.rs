//! Security, as an attacker would try it: configuration that reads files or runs code on a
//! Varnish host is refused by the API and cannot be turned on through the deploy's varnishd.
//! (Authentication of API callers and agents is still to come.)

use anyhow::{Context, Result};
use tonic::Code;
use tonic_types::StatusExt;
use vaas_agent::varnish_cli::{CliError, CliTimeouts, VarnishCli};
use vaas_proto::v1::{GetVclTemplateRequest, UpdateVclTemplateRequest, VclTemplate};
use vaas_testkit::Varnishd;
use vaas_tests::{StoreKind, System, on_both_stores};

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
    let stored = system
        .config()
        .get_vcl_template(GetVclTemplateRequest {
            id: setup.template_id,
        })
        .await?
        .into_inner()
        .vcl_template
        .context("template")?;
    assert_eq!(stored.content, "<VCL/>", "nothing was saved");
    system.ensure_running()
}

#[tokio::test]
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
#[tokio::test]
async fn watchers_that_leave_release_their_subscriptions() -> Result<()> {
    use std::time::Duration;
    use tokio::time::Instant;
    use vaas_proto::v1::{CreateBackendRequest, WatchTaskRequest};

    let mut system = System::builder(StoreKind::Sqlite).start().await?;
    let setup = system.set_up().await?;
    // Without a scheduler the task stays PENDING, so every watch stays open.
    system.stop_scheduler(0);
    let mut request = tonic::Request::new(CreateBackendRequest {
        backend: Some(vaas_tests::backend_for(
            &setup,
            "127.0.0.1:9".parse().context("address")?,
        )),
    });
    request.metadata_mut().insert(
        "prefer",
        tonic::metadata::MetadataValue::from_static("respond-async"),
    );
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

/// The agent reports at attach what makes its varnishd unsafe, and the API shows it per server.
/// The test kit's varnishd runs the deploy's parameters except that `cc_command` stays writable
/// (the reload benchmark changes it), so exactly that is reported.
#[tokio::test]
async fn each_server_shows_what_makes_its_varnishd_unsafe() -> Result<()> {
    let mut system = System::builder(StoreKind::Sqlite).start().await?;
    let setup = system.set_up().await?;
    let server = system.server(setup.server_id).await?;
    assert_eq!(
        server.unsafe_settings,
        ["cc_command is not read-only (start varnishd with -r cc_command)"]
    );
    system.ensure_running()
}
