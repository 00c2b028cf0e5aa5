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
    #[command(subcommand)]
    command: Option<Command>,
}

/// What to do instead of serving.
#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Creates a token directly in the store and prints its secret on stdout: the first admin
    /// token of a new installation, or the way back in when every admin token is lost.
    CreateToken(vaas_api::token_service::CreateTokenArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Args = match vaas_runtime::parse_args(BINARY) {
        Ok(args) => args,
        Err(exit) => return exit,
    };
    if let Some(Command::CreateToken(create)) = args.command {
        return match vaas_api::token_service::create_token_in_store(&create).await {
            Ok((token, secret)) => {
                eprintln!(
                    "{BINARY}: created token {} {:?} ({}), expires {}",
                    token.id,
                    token.name,
                    create.role,
                    token
                        .expire_time
                        .map(|time| time.to_string())
                        .unwrap_or_default()
                );
                println!("{secret}");
                ExitCode::SUCCESS
            }
            Err(message) => vaas_runtime::config_error(BINARY, message),
        };
    }
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
        Err(vaas_api::StartError::Tls(error)) => {
            vaas_runtime::config_error(BINARY, vaas_runtime::error_chain(&error))
        }
        Err(error) => vaas_runtime::runtime_error(BINARY, &error),
    }
}
