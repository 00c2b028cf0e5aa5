//! TLS on every gRPC hop, as an eavesdropper or an impostor would meet it: with TLS configured,
//! the API refuses plaintext clients and serves those that trust its CA, agents attach to the
//! scheduler over mutual TLS and reloads go through, and a client without a certificate of the
//! CA cannot open the agents' stream.

use std::time::Duration;

use anyhow::{Context, Result};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use vaas_proto::v1::AttachRequest;
use vaas_proto::v1::agent_service_client::AgentServiceClient;
use vaas_tests::{StoreKind, System, client_tls};

/// Bounds every call of these tests: a refused connection must fail, not hang.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// Asks the gRPC health service of `channel` for the server's overall status.
async fn health(channel: Channel) -> Result<ServingStatus, tonic::Status> {
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    Ok(response.into_inner().status())
}

/// Asserts that a call failed on the connection (the server hung up or sent a TLS alert), not
/// with an answer of the service.
fn assert_refused_by_transport(status: &tonic::Status) {
    let source = std::error::Error::source(status).expect("a transport error as source");
    assert!(
        source.is::<tonic::transport::Error>(),
        "the connection failed, no service answered: {status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tls_the_api_refuses_plaintext_clients_and_serves_those_that_trust_its_ca()
-> Result<()> {
    let mut system = System::builder(StoreKind::Sqlite).tls(true).start().await?;
    let files = system.tls_files().context("a system with tls")?;

    let plaintext = Endpoint::from_shared(format!("http://{}", system.api_addr()))?
        .timeout(CALL_TIMEOUT)
        .connect_lazy();
    let refused = health(plaintext)
        .await
        .expect_err("a plaintext client is refused");
    assert_refused_by_transport(&refused);

    let trusting = Endpoint::from_shared(format!("https://{}", system.api_addr()))?
        .timeout(CALL_TIMEOUT)
        .tls_config(client_tls(files, false)?)?
        .connect()
        .await?;
    assert_eq!(health(trusting).await?, ServingStatus::Serving);
    system.ensure_running()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tls_agents_attach_over_mutual_tls_and_a_new_server_gets_its_vcl() -> Result<()> {
    let mut system = System::builder(StoreKind::Sqlite).tls(true).start().await?;
    // set_up registers the agent's varnishd and fails unless its reload succeeded.
    let setup = system.set_up().await?;
    let server = system.server(setup.server_id).await?;
    assert_eq!(server.id, setup.server_id);
    assert!(
        system.succeeded_reloads() >= 1,
        "{}",
        system.scheduler_log()
    );
    system.ensure_running()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mutual_tls_a_client_without_a_certificate_cannot_attach_as_an_agent() -> Result<()> {
    let mut system = System::builder(StoreKind::Sqlite).tls(true).start().await?;
    let files = system.tls_files().context("a system with tls")?;
    let scheduler = format!("https://{}", system.scheduler_addr(0));

    let without_certificate = Endpoint::from_shared(scheduler.clone())?
        .timeout(CALL_TIMEOUT)
        .tls_config(client_tls(files, false)?)?
        .connect_lazy();
    let refused = tokio::time::timeout(
        CALL_TIMEOUT,
        AgentServiceClient::new(without_certificate)
            .attach(futures::stream::pending::<AttachRequest>()),
    )
    .await
    .context("attach without a certificate neither failed nor succeeded")?
    .expect_err("attach without a client certificate is refused");
    // The code varies with the moment the client notices (a CertificateRequired alert, a
    // closed connection), but it is always the connection that fails.
    assert_refused_by_transport(&refused);

    // The same client with the CA's client certificate gets through the handshake.
    let with_certificate = Endpoint::from_shared(scheduler)?
        .timeout(CALL_TIMEOUT)
        .tls_config(client_tls(files, true)?)?
        .connect()
        .await?;
    health(with_certificate).await?;
    system.ensure_running()
}
