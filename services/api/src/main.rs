//! The vaas-api binary: parses flags, binds the listener, runs [`vaas_api::run`].

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;

const BINARY: &str = "vaas-api";

/// vaas-api: stores VaaS configuration changes and publishes reload intents.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address the gRPC server listens on.
    #[arg(long, env = "VAAS_API_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    #[command(flatten)]
    config: vaas_api::Config,
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
    match vaas_api::run(args.config, listener, vaas_runtime::shutdown_on_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(vaas_api::StartError::Store(vaas_store::Error::UnsupportedUrl)) => {
            vaas_runtime::config_error(
                BINARY,
                "--database-url must start with postgres:// or sqlite:",
            )
        }
        Err(vaas_api::StartError::Bus(error)) if error.is_configuration() => {
            vaas_runtime::config_error(BINARY, vaas_runtime::error_chain(&error))
        }
        Err(error) => vaas_runtime::runtime_error(BINARY, &error),
    }
}
