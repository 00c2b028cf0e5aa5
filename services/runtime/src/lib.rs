//! What every VaaS binary and gRPC server does around its own work: parsing flags (bad ones exit
//! with code 64 and one line), setting up logging, turning SIGINT/SIGTERM into a cancellation,
//! serving gRPC reflection (v1 and v1alpha) for the VaaS protos, and TLS for gRPC servers and
//! clients ([`tls`]).
//!
//! It holds no business logic, and no configuration besides the TLS flag groups that services
//! flatten into theirs: each service's `run` stays in its crate and is called by a thin `main`.

pub mod tls;

pub mod auth;

use std::process::ExitCode;

use tokio_util::sync::CancellationToken;
use tonic_reflection::server::{v1, v1alpha};

/// Exit code for bad configuration (EX_USAGE from sysexits.h).
pub const EXIT_CONFIG: u8 = 64;

/// Parses the command line; on `--help`/`--version` prints and returns `Err(SUCCESS)`, on a bad
/// flag prints one line prefixed with `binary` and returns `Err(64)`.
pub fn parse_args<A: clap::Parser>(binary: &str) -> Result<A, ExitCode> {
    match A::try_parse() {
        Ok(args) => Ok(args),
        Err(error) if !error.use_stderr() => {
            let _ = error.print();
            Err(ExitCode::SUCCESS)
        }
        Err(error) => {
            // One line: clap's message up to its usage section.
            let message = error.to_string();
            let summary = message
                .lines()
                .map(str::trim)
                .take_while(|line| !line.is_empty())
                .collect::<Vec<_>>()
                .join(" ");
            let summary = summary.strip_prefix("error: ").unwrap_or(&summary);
            eprintln!("{binary}: {summary}");
            Err(ExitCode::from(EXIT_CONFIG))
        }
    }
}

/// Prints a configuration error as one line and returns exit code 64.
pub fn config_error(binary: &str, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("{binary}: {message}");
    ExitCode::from(EXIT_CONFIG)
}

/// Prints an error with its chain of causes as one line and returns exit code 1.
pub fn runtime_error(binary: &str, error: &(dyn std::error::Error + 'static)) -> ExitCode {
    eprintln!("{binary}: {}", error_chain(error));
    ExitCode::FAILURE
}

/// Formats an error and its sources as one line: "error: cause: cause of the cause".
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

/// Logs structured lines to stderr, filtered by `RUST_LOG` (default `info`), coloured only when
/// stderr is a terminal.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Returns a token cancelled at the first SIGINT or SIGTERM. Call inside a tokio runtime.
pub fn shutdown_on_signal() -> CancellationToken {
    let shutdown = CancellationToken::new();
    let cancel = shutdown.clone();
    tokio::spawn(async move {
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut terminate) => {
                    terminate.recv().await;
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot watch SIGTERM; only Ctrl-C stops this process");
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = terminate => {}
        }
        tracing::info!("shutting down");
        cancel.cancel();
    });
    shutdown
}

/// The gRPC reflection services, v1 and v1alpha (grpcurl 1.8 and Python's grpcio-reflection
/// speak only v1alpha), describing the VaaS protos and gRPC health.
pub struct Reflection<V1, V1Alpha> {
    /// `grpc.reflection.v1.ServerReflection`.
    pub v1: V1,
    /// `grpc.reflection.v1alpha.ServerReflection`.
    pub v1alpha: V1Alpha,
}

/// Builds both reflection services.
pub fn reflection() -> Result<
    Reflection<
        v1::ServerReflectionServer<impl v1::ServerReflection>,
        v1alpha::ServerReflectionServer<impl v1alpha::ServerReflection>,
    >,
    tonic_reflection::server::Error,
> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(vaas_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok(Reflection {
        v1: builder().build_v1()?,
        v1alpha: builder().build_v1alpha()?,
    })
}
