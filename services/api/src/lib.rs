//! vaas-api: the gRPC API of VaaS. It validates and stores configuration changes (with one reload
//! task per affected cluster and an outbox row, in one transaction), publishes reload intents
//! to NATS JetStream through the outbox relay, and serves tasks, including a streaming watch.
//!
//! It never talks to Varnish: reloads are the scheduler's job. Run it with [`run`]; the binary
//! in `main.rs` only parses flags, binds the listener and calls it.

pub mod address_policy;
pub mod auth;
pub mod config_service;
pub mod error;
pub mod explain;
pub mod field_mask;
pub mod follow;
mod relay;
pub mod revisions;
pub mod task_service;
pub mod token_service;
pub mod validate;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;
use vaas_proto::v1::config_service_server::ConfigServiceServer;
use vaas_proto::v1::status_service_server::StatusServiceServer;
use vaas_proto::v1::task_service_server::TaskServiceServer;
use vaas_proto::v1::token_service_server::TokenServiceServer;
use vaas_store::Store;

use vaas_runtime::auth::AuthLayer;

use crate::auth::ApiAuthenticator;
use crate::config_service::ConfigApi;
use crate::follow::TaskFollower;
use crate::task_service::TaskApi;
use crate::token_service::TokenApi;

/// Configuration of vaas-api; every flag can also be set through its environment variable.
#[derive(Clone, Debug, clap::Args)]
pub struct Config {
    /// Store URL: `sqlite://path/vaas.db?mode=rwc` or `postgres://user:pass@host/db`.
    #[arg(
        long,
        env = "VAAS_DATABASE_URL",
        default_value = "sqlite://vaas.db?mode=rwc"
    )]
    pub database_url: String,
    /// NATS server URL (JetStream enabled, version 2.10 or newer).
    #[arg(long, env = "VAAS_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// How to authenticate to NATS (`--nats-user` and `--nats-password-file`).
    #[command(flatten)]
    pub nats_auth: vaas_bus::NatsAuth,
    /// Longest time a synchronous write waits for its reloads (the caller's deadline, when
    /// shorter, wins).
    #[arg(long, env = "VAAS_SYNC_TIMEOUT", default_value = "120s", value_parser = humantime::parse_duration)]
    pub sync_timeout: Duration,
    /// Networks that backends may not point at, comma-separated CIDRs (link-local by default,
    /// which reaches cloud metadata services); an empty value denies nothing.
    #[arg(
        long,
        env = "VAAS_BACKEND_DENY_NETWORKS",
        default_value = address_policy::DEFAULT_DENIED,
        value_delimiter = ',',
        value_parser = clap::value_parser!(address_policy::Network),
    )]
    pub backend_deny_networks: Vec<address_policy::Network>,
    /// How often the outbox and followed tasks are re-read even without a notification.
    #[arg(long, env = "VAAS_POLL_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub poll_interval: Duration,
    /// TLS of the gRPC server (plaintext when not configured).
    #[command(flatten)]
    pub tls: vaas_runtime::tls::ServerTls,
}

/// What stops the API from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The store could not be opened or migrated.
    #[error("cannot open the store")]
    Store(#[from] vaas_store::Error),
    /// NATS could not be reached.
    #[error("cannot connect to nats")]
    Bus(#[from] vaas_bus::Error),
    /// The gRPC server failed.
    #[error("grpc server failed")]
    Serve(#[from] tonic::transport::Error),
    /// The reflection service could not be built.
    #[error("cannot build the reflection service")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The TLS flags name missing or unusable files.
    #[error("bad tls configuration")]
    Tls(#[from] vaas_runtime::tls::TlsError),
}

/// Serves the API on `listener` until `shutdown` is cancelled, then stops the relay and the
/// watches and returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    // Checked first: a TLS mistake is reported before any connection is made.
    let (server, tls_on) = config.tls.server_builder()?;
    let store = Store::connect(&config.database_url)
        .await?
        .with_routing_check(vaas_store::RoutingCheck::new(
            vaas_vcl::routing::check_examples,
        ));
    let (nats, jetstream) =
        vaas_bus::connect(&config.nats_url, "vaas-api", &config.nats_auth).await?;
    let tasks = TaskTracker::new();
    let relay_wake = Arc::new(Notify::new());
    tasks.spawn(relay::run(
        store.clone(),
        jetstream,
        relay_wake.clone(),
        config.poll_interval,
        shutdown.clone(),
    ));
    let follower = TaskFollower::new(nats, store.clone(), config.poll_interval);
    let config_api = ConfigApi::new(
        store.clone(),
        follower.clone(),
        relay_wake,
        config.sync_timeout,
        address_policy::AddressPolicy::new(config.backend_deny_networks.clone()),
    );
    let task_api = TaskApi::new(store.clone(), follower, tasks.clone(), shutdown.clone());

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ConfigServiceServer<ConfigApi>>().await;
    health.set_serving::<TaskServiceServer<TaskApi>>().await;
    health.set_serving::<StatusServiceServer<TaskApi>>().await;
    health.set_serving::<TokenServiceServer<TokenApi>>().await;
    let reflection = vaas_runtime::reflection()?;

    info!(address = ?listener.local_addr().ok(), tls = tls_on, "vaas-api serving");
    let served = server
        .timeout(Duration::from_secs(3600))
        .layer(AuthLayer::new(ApiAuthenticator::new(store.clone())))
        .add_service(health_service)
        .add_service(reflection.v1)
        .add_service(reflection.v1alpha)
        .add_service(
            ConfigServiceServer::new(config_api)
                .max_decoding_message_size(vaas_proto::MAX_API_REQUEST_BYTES),
        )
        .add_service(StatusServiceServer::new(task_api.clone()))
        .add_service(TaskServiceServer::new(task_api))
        .add_service(TokenServiceServer::new(TokenApi::new(store.clone())))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled())
        .await;
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    store.close().await;
    info!("vaas-api stopped");
    Ok(served?)
}
