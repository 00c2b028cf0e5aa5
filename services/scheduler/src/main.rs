//! The vaas-scheduler binary: parses flags, binds the listener, runs [`vaas_scheduler::run`].

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;

const BINARY: &str = "vaas-scheduler";

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
    let args: Args = match vaas_runtime::parse_args(BINARY) {
        Ok(args) => args,
        Err(exit) => return exit,
    };
    vaas_runtime::init_logging();
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(listener) => listener,
        Err(error) => return vaas_runtime::runtime_error(BINARY, &error),
    };
    match vaas_scheduler::run(args.config, listener, vaas_runtime::shutdown_on_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(vaas_scheduler::StartError::Store(vaas_store::Error::UnsupportedUrl)) => {
            vaas_runtime::config_error(
                BINARY,
                "--database-url must start with postgres:// or sqlite:",
            )
        }
        Err(vaas_scheduler::StartError::Bus(error)) if error.is_configuration() => {
            vaas_runtime::config_error(BINARY, vaas_runtime::error_chain(&error))
        }
        Err(vaas_scheduler::StartError::Tls(error)) => {
            vaas_runtime::config_error(BINARY, vaas_runtime::error_chain(&error))
        }
        Err(error) => vaas_runtime::runtime_error(BINARY, &error),
    }
}
