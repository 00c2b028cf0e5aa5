//! Schema migrations, written once for both dialects with a few placeholders.
//!
//! `{id}` becomes an auto-incrementing 64-bit primary key and `{int}` a 64-bit integer. Booleans
//! are stored as 0/1 integers so both drivers decode them alike. Each migration runs in its own
//! transaction; on PostgreSQL an advisory lock keeps replicas that start together from racing.

use sqlx::{Acquire, Executor};

use crate::{Dialect, Result, Store};

/// The migrations in order; a migration once released is never edited, only followed by another.
const MIGRATIONS: &[(i64, &str)] = &[(1, INITIAL_SCHEMA)];

const INITIAL_SCHEMA: &str = r#"
CREATE TABLE vaas_clock (
    id {int} PRIMARY KEY,
    value {int} NOT NULL
);
INSERT INTO vaas_clock (id, value) VALUES (1, 0);
CREATE TABLE dcs (
    id {id},
    name TEXT NOT NULL,
    symbol TEXT NOT NULL UNIQUE
);
CREATE TABLE clusters (
    id {id},
    name TEXT NOT NULL UNIQUE,
    labels TEXT NOT NULL DEFAULT '',
    partial_reload {int} NOT NULL DEFAULT 0,
    service_mesh_routing {int} NOT NULL DEFAULT 0,
    reload_timestamp {int},
    error_timestamp {int},
    last_error TEXT NOT NULL DEFAULT ''
);
CREATE TABLE vcl_templates (
    id {id},
    name TEXT NOT NULL UNIQUE,
    content TEXT NOT NULL,
    syntax {int} NOT NULL,
    comment TEXT NOT NULL DEFAULT ''
);
CREATE TABLE varnish_servers (
    id {id},
    address TEXT NOT NULL,
    hostname TEXT NOT NULL DEFAULT '',
    http_port {int} NOT NULL,
    admin_port {int} NOT NULL,
    status {int} NOT NULL,
    dc_id {int} NOT NULL REFERENCES dcs (id),
    template_id {int} NOT NULL REFERENCES vcl_templates (id),
    cluster_id {int} NOT NULL REFERENCES clusters (id),
    is_canary {int} NOT NULL DEFAULT 0,
    running_vcl_version TEXT NOT NULL DEFAULT '',
    agent_seen_time {int},
    UNIQUE (address, admin_port)
);
CREATE TABLE directors (
    id {id},
    name TEXT NOT NULL UNIQUE,
    service TEXT NOT NULL DEFAULT '',
    mode {int} NOT NULL,
    router {int} NOT NULL,
    route_expression TEXT NOT NULL DEFAULT '',
    active_active {int} NOT NULL,
    enabled {int} NOT NULL
);
CREATE TABLE director_clusters (
    director_id {int} NOT NULL REFERENCES directors (id) ON DELETE CASCADE,
    cluster_id {int} NOT NULL REFERENCES clusters (id) ON DELETE CASCADE,
    PRIMARY KEY (director_id, cluster_id)
);
CREATE INDEX director_clusters_by_cluster ON director_clusters (cluster_id);
CREATE TABLE backends (
    id {id},
    director_id {int} NOT NULL REFERENCES directors (id),
    dc_id {int} NOT NULL REFERENCES dcs (id),
    address TEXT NOT NULL,
    port {int} NOT NULL,
    weight {int} NOT NULL,
    max_connections {int} NOT NULL,
    connect_timeout_micros {int} NOT NULL,
    first_byte_timeout_micros {int} NOT NULL,
    between_bytes_timeout_micros {int} NOT NULL,
    enabled {int} NOT NULL,
    tags TEXT NOT NULL DEFAULT '',
    UNIQUE (address, port, director_id)
);
CREATE INDEX backends_by_director ON backends (director_id);
CREATE TABLE tasks (
    id {id},
    cluster_id {int} NOT NULL REFERENCES clusters (id) ON DELETE CASCADE,
    timestamp {int} NOT NULL,
    state {int} NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    create_time {int} NOT NULL,
    start_time {int},
    finish_time {int}
);
CREATE INDEX tasks_by_cluster_state ON tasks (cluster_id, state, timestamp);
CREATE TABLE outbox (
    id {id},
    task_id {int} NOT NULL,
    cluster_id {int} NOT NULL,
    timestamp {int} NOT NULL
)
"#;

/// Brings the schema up to date.
pub(crate) async fn apply(store: &Store) -> Result<()> {
    let mut connection = store.pool.acquire().await?;
    if store.dialect == Dialect::Postgres {
        connection
            .execute("SELECT pg_advisory_lock(730011)")
            .await?;
    }
    let outcome = apply_pending(&mut connection, store.dialect).await;
    if store.dialect == Dialect::Postgres {
        connection
            .execute("SELECT pg_advisory_unlock(730011)")
            .await?;
    }
    outcome
}

async fn apply_pending(connection: &mut sqlx::AnyConnection, dialect: Dialect) -> Result<()> {
    connection
        .execute("CREATE TABLE IF NOT EXISTS vaas_schema_migrations (version BIGINT PRIMARY KEY)")
        .await?;
    for (version, schema) in MIGRATIONS {
        let mut transaction = connection.begin().await?;
        let applied: Option<i64> =
            sqlx::query_scalar("SELECT version FROM vaas_schema_migrations WHERE version = $1")
                .bind(*version)
                .fetch_optional(&mut *transaction)
                .await?;
        if applied.is_some() {
            continue;
        }
        for statement in render(schema, dialect).split(';') {
            if !statement.trim().is_empty() {
                transaction.execute(statement).await?;
            }
        }
        sqlx::query("INSERT INTO vaas_schema_migrations (version) VALUES ($1)")
            .bind(*version)
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        tracing::info!(version, "applied store migration");
    }
    Ok(())
}

fn render(schema: &str, dialect: Dialect) -> String {
    let (id, int) = match dialect {
        Dialect::Postgres => ("BIGSERIAL PRIMARY KEY", "BIGINT"),
        Dialect::Sqlite => ("INTEGER PRIMARY KEY AUTOINCREMENT", "INTEGER"),
    };
    schema.replace("{id}", id).replace("{int}", int)
}
