//! The VaaS configuration store: schema, migrations and queries, for PostgreSQL (production,
//! shared by several API replicas) and SQLite (the embedded default for a single node).
//!
//! Every configuration write runs in one transaction that also takes a store timestamp, creates a
//! reload task for every cluster whose VCL may change, and adds an outbox row per task for the
//! relay that publishes intents. It also holds the lease of the scheduler replica that drives
//! reloads. The store speaks in `vaas_proto::v1` messages; it checks references and uniqueness,
//! but the format of fields is validated by the API before it gets here.
//! It knows nothing of NATS or gRPC.

mod audit;
mod clock;
mod error;
mod lease;
mod migrations;
mod progress;
mod resource;
mod resources;
mod rows;
mod snapshot;
mod tasks;
mod tokens;
mod write;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor};

pub use error::{Error, Result};
pub use lease::LeaderLease;
pub use progress::{KEPT_RELOADS_PER_CLUSTER, ReloadProgressRow};
pub use resource::{Change, Condition, Page, Resource, Tx, Value};
pub use tasks::{
    LAST_ERROR_MAX_CHARS, OutboxEntry, TASK_ERROR_MAX_CHARS, TaskOutcome, TaskPage, VarnishSettings,
};
pub use tokens::{Authentication, NewToken, SECRET_PREFIX};
pub use write::{MAX_BATCH_TIME, MAX_BATCH_WRITES, WRITE_QUEUE, WriteOutcome};

/// Which SQL database a [`Store`] talks to; the few statements that differ are chosen by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// PostgreSQL 13 or newer.
    Postgres,
    /// SQLite 3.35 or newer (bundled).
    Sqlite,
}

/// A handle on the configuration store; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    dialect: Dialect,
    /// Who the writes of this handle are recorded as in the audit history.
    actor: Arc<str>,
    /// The scheduler term this handle finishes tasks for, if fenced: a task write is refused
    /// once another term holds the leader lease.
    fence: Option<i64>,
    /// Checks the routing of every cluster a routing change touches, inside the write and
    /// before its commit (see [`RoutingCheck`]).
    routing_check: Option<RoutingCheck>,
    /// The writer every configuration write of this store goes through (group commit).
    writer: Arc<write::Writer>,
}

/// Checks one cluster's configuration as a write would leave it (route positive URLs, redirect
/// assertions); an error refuses the whole write with [`Error::Invalid`], its text the reason.
/// The API installs it: the store knows nothing of how VCL routes.
#[derive(Clone)]
pub struct RoutingCheck(Arc<CheckFn>);

/// The function inside a [`RoutingCheck`].
type CheckFn =
    dyn Fn(&vaas_proto::v1::ClusterSnapshot) -> std::result::Result<(), String> + Send + Sync;

impl RoutingCheck {
    /// Wraps `check`.
    pub fn new(
        check: impl Fn(&vaas_proto::v1::ClusterSnapshot) -> std::result::Result<(), String>
        + Send
        + Sync
        + 'static,
    ) -> RoutingCheck {
        RoutingCheck(Arc::new(check))
    }

    /// Runs the check on `snapshot`.
    pub(crate) fn run(
        &self,
        snapshot: &vaas_proto::v1::ClusterSnapshot,
    ) -> std::result::Result<(), String> {
        (self.0)(snapshot)
    }
}

impl std::fmt::Debug for RoutingCheck {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("RoutingCheck")
    }
}

impl Store {
    /// Connects to `url` (`postgres://…` or `sqlite://path?mode=rwc`) and applies pending
    /// migrations.
    pub async fn connect(url: &str) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let dialect = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Dialect::Postgres
        } else if url.starts_with("sqlite:") {
            Dialect::Sqlite
        } else {
            return Err(Error::UnsupportedUrl);
        };
        let options = AnyConnectOptions::from_str(url)?;
        let pool = AnyPoolOptions::new()
            .max_connections(match dialect {
                Dialect::Postgres => 16,
                Dialect::Sqlite => 4,
            })
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |connection, _| {
                Box::pin(async move {
                    if dialect == Dialect::Sqlite {
                        // WAL lets the scheduler read snapshots while the API writes; the busy
                        // timeout makes concurrent writers wait instead of failing.
                        connection.execute("PRAGMA journal_mode = WAL").await?;
                        connection.execute("PRAGMA busy_timeout = 10000").await?;
                        connection.execute("PRAGMA foreign_keys = ON").await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        let store = Store {
            writer: Arc::new(write::Writer::start(pool.clone())),
            pool,
            dialect,
            actor: Arc::from("vaas-store"),
            fence: None,
            routing_check: None,
        };
        migrations::apply(&store).await?;
        Ok(store)
    }

    /// Returns a handle whose writes the audit history records as made by `actor`.
    pub fn acting_as(&self, actor: &str) -> Store {
        Store {
            actor: Arc::from(actor),
            ..self.clone()
        }
    }

    /// Returns a handle that starts and finishes tasks only while scheduler term `term` holds
    /// the leader lease (a fencing token): a leader that lost its lease without noticing cannot
    /// record anything any more.
    pub fn fenced(&self, term: i64) -> Store {
        Store {
            fence: Some(term),
            ..self.clone()
        }
    }

    /// Returns a handle that runs `check` on every cluster whose routing a write changes (routes,
    /// directors), before the write commits.
    pub fn with_routing_check(&self, check: RoutingCheck) -> Store {
        Store {
            routing_check: Some(check),
            ..self.clone()
        }
    }

    /// Returns the SQL dialect of this store.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Closes every pooled connection; waits for connections in use to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}
