//! The `vaas-agent` binary: parses flags (each also from an environment variable), initialises
//! logging, and calls [`vaas_agent::run`] until Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

const BINARY: &str = "vaas-agent";

/// Runs beside varnishd: renders and loads VCL on vaas-scheduler's command.
#[derive(Debug, Parser)]
#[command(name = "vaas-agent", version)]
struct Args {
    /// URL of vaas-scheduler's gRPC endpoint; several replicas as a comma-separated list.
    #[arg(
        long,
        env = "VAAS_SCHEDULER_URL",
        default_value = "http://127.0.0.1:50052"
    )]
    scheduler_url: String,
    /// varnishd's admin address (its -T argument).
    #[arg(long, env = "VAAS_VARNISH_ADMIN", default_value = "127.0.0.1:6082")]
    varnish_admin: SocketAddr,
    /// varnishd's secret file (its -S argument).
    #[arg(long, env = "VAAS_VARNISH_SECRET_FILE")]
    varnish_secret_file: PathBuf,
    /// The server's address as registered in VaaS [default: the varnish-admin IP].
    #[arg(long, env = "VAAS_SERVER_ADDRESS")]
    server_address: Option<String>,
    /// The server's admin port as registered in VaaS [default: the varnish-admin port].
    #[arg(long, env = "VAAS_SERVER_ADMIN_PORT")]
    server_admin_port: Option<u16>,
    /// Directory where the last committed VCL is kept, restored into an empty varnishd even
    /// while no scheduler is reachable [default: none, nothing is kept].
    #[arg(long, env = "VAAS_AGENT_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// How often varnishd is checked while idle; an empty or restarted varnishd gets the last
    /// good VCL back and the scheduler is told.
    #[arg(long, env = "VAAS_AGENT_HEALTH_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    health_interval: std::time::Duration,
    /// Host name reported to the scheduler [default: the machine's host name].
    #[arg(long, env = "VAAS_HOSTNAME")]
    hostname: Option<String>,
    /// File holding this server's agent token (TokenService.CreateToken with role agent and the
    /// server's id); read at every connection, so a rotated token needs no restart.
    #[arg(long, env = "VAAS_AGENT_TOKEN_FILE")]
    token_file: PathBuf,
    /// Servers with at least this many backends get their VCL split into a top VCL and shard
    /// VCLs, so that a backend change recompiles one shard; "off" always loads one VCL.
    #[arg(long, env = "VAAS_AGENT_SPLIT_MIN_BACKENDS", default_value = "1000")]
    split_min_backends: String,
    /// How many shards a split VCL has.
    #[arg(long, env = "VAAS_AGENT_SPLIT_SHARDS", default_value = "32", value_parser = clap::value_parser!(u16).range(1..=1024))]
    split_shards: u16,
    /// TLS towards https:// scheduler URLs.
    #[command(flatten)]
    tls: vaas_runtime::tls::ClientTls,
}

fn main() -> ExitCode {
    let args: Args = match vaas_runtime::parse_args(BINARY) {
        Ok(args) => args,
        Err(exit) => return exit,
    };
    let config = match config(args) {
        Ok(config) => config,
        Err(message) => return vaas_runtime::config_error(BINARY, message),
    };
    vaas_runtime::init_logging();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => return vaas_runtime::runtime_error(BINARY, &error),
    };
    runtime.block_on(async {
        match vaas_agent::run(config, vaas_runtime::shutdown_on_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => vaas_runtime::config_error(BINARY, error),
        }
    })
}

/// Validates the arguments into a configuration; the error is one line saying what to fix.
fn config(args: Args) -> Result<vaas_agent::Config, String> {
    if let Err(error) = std::fs::File::open(&args.varnish_secret_file) {
        return Err(format!(
            "cannot read --varnish-secret-file {}: {error}",
            args.varnish_secret_file.display()
        ));
    }
    let mut config = vaas_agent::Config::new(
        args.scheduler_url,
        args.varnish_admin,
        args.varnish_secret_file,
    );
    config.tls = args
        .tls
        .client_config()
        .map_err(|error| vaas_runtime::error_chain(&error))?;
    match vaas_agent::endpoints(&config) {
        Ok(_) => {}
        // An https:// URL without --tls-ca is refused here, never downgraded to plaintext.
        Err(vaas_agent::Error::SchedulerUrl(error)) => {
            return Err(format!(
                "--scheduler-url: {}",
                vaas_runtime::error_chain(&error)
            ));
        }
        Err(error) => return Err(format!("invalid --scheduler-url: {error}")),
    }
    if let Some(address) = args.server_address {
        if address.parse::<std::net::IpAddr>().is_err() {
            return Err(format!(
                "--server-address {address:?} is not an IPv4 or IPv6 address"
            ));
        }
        config.server_address = address;
    }
    if let Some(port) = args.server_admin_port {
        config.server_admin_port = port;
    }
    if let Err(error) = std::fs::File::open(&args.token_file) {
        return Err(format!(
            "cannot read --token-file {}: {error}",
            args.token_file.display()
        ));
    }
    config.token_file = Some(args.token_file);
    config.hostname = args.hostname.unwrap_or_else(system_hostname);
    config.state_dir = args.state_dir;
    if args.health_interval < std::time::Duration::from_millis(100) {
        return Err("--health-interval must be at least 100ms".to_owned());
    }
    config.health_interval = args.health_interval;
    config.vcl_split = match args.split_min_backends.as_str() {
        "off" => None,
        count => Some(vaas_vcl::SplitOptions {
            shards: usize::from(args.split_shards),
            min_backends: count.parse().map_err(|_| {
                format!("--split-min-backends {count:?} is neither a number nor \"off\"")
            })?,
        }),
    };
    Ok(config)
}

/// Returns the machine's host name, or an empty string.
fn system_hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|name| name.trim().to_owned())
        .unwrap_or_default()
}
