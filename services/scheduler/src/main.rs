//! The vaas-scheduler binary: parses flags, binds the listener, runs [`vaas_scheduler::run`].

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

/// vaas-scheduler: drives cluster reloads through the vaas-agents.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address the gRPC server (AgentService) listens on.
    #[arg(long, env = "VAAS_SCHEDULER_LISTEN", default_value = "127.0.0.1:50052")]
    listen: SocketAddr,
    #[command(flatten)]
    config: vaas_scheduler::Config,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(error) if !error.use_stderr() => {
            let _ = error.print();
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            let message = error.to_string();
            eprintln!(
                "vaas-scheduler: {}",
                message.lines().next().unwrap_or("invalid arguments")
            );
            return ExitCode::from(64);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("vaas-scheduler: cannot listen on {}: {error}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    match vaas_scheduler::run(args.config, listener, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(vaas_scheduler::StartError::Store(vaas_store::Error::UnsupportedUrl)) => {
            eprintln!("vaas-scheduler: --database-url must start with postgres:// or sqlite:");
            ExitCode::from(64)
        }
        Err(error) => {
            let chain: Vec<String> = anyhow::Error::from(error)
                .chain()
                .map(ToString::to_string)
                .collect();
            eprintln!("vaas-scheduler: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler cannot fail on unix");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    shutdown.cancel();
}
