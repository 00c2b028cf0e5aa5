//! Real external processes for tests: `nats-server` with JetStream, PostgreSQL, `varnishd`, and a
//! tiny HTTP origin, each on free ports with its own temporary directory.
//!
//! Every start function waits for a readiness condition with a deadline (never a fixed sleep),
//! retries with new ports when the process dies because its port was taken, and fails with the
//! process's captured log otherwise. Every process writes stdout and stderr to a log file in its
//! temporary directory; `log()` returns it. Dropping a handle stops the process (its whole process
//! group) and prints its log to stderr, which the test harness shows only for failing tests
//! (set `VAAS_TESTKIT_QUIET=1` to print logs only while panicking). [`TlsFiles`] makes a
//! throwaway CA with server and client certificates for TLS tests.
//!
//! This crate starts and stops processes; it knows nothing about VaaS itself (the `vaas-tests`
//! harness builds on it).

mod http;
mod nats;
mod origin;
mod postgres;
mod process;
mod service;
mod tls;
mod varnishd;

pub use http::{HttpResponse, http_get, http_request};
pub use nats::Nats;
pub use origin::HttpOrigin;
pub use postgres::Postgres;
pub use service::ServiceProcess;
pub use tls::TlsFiles;
pub use varnishd::{DEPLOY_PARAMS, Varnishd, cc_command_with, deploy_cc_command};

use std::net::{Ipv4Addr, TcpListener};
use std::time::Duration;

/// How long a start function waits for its process to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Returns a TCP port on 127.0.0.1 that was free a moment ago.
///
/// Another process can take the port before it is used; the start functions of this crate retry
/// with a new port when that happens.
///
/// # Panics
///
/// Panics when the operating system cannot bind an ephemeral port on 127.0.0.1 at all.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .expect("binding an ephemeral port on 127.0.0.1 must work on a test machine");
    listener
        .local_addr()
        .expect("a bound listener has a local address")
        .port()
}
