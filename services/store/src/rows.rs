//! Conversions between database rows and `vaas_proto::v1` messages.

use prost_types::{Duration, Timestamp};
use sqlx::Row;
use sqlx::any::AnyRow;
use vaas_proto::v1::{Backend, Cluster, Dc, Director, Task, VarnishServer, VclTemplate};

use crate::Result;

pub(crate) const DC_COLUMNS: &str = "id, name, symbol";
pub(crate) const CLUSTER_COLUMNS: &str = "id, name, labels, partial_reload, service_mesh_routing, \
     reload_timestamp, error_timestamp, last_error";
pub(crate) const TEMPLATE_COLUMNS: &str = "id, name, content, syntax, comment";
pub(crate) const SERVER_COLUMNS: &str = "id, address, hostname, http_port, admin_port, status, \
     dc_id, template_id, cluster_id, is_canary, running_vcl_version, agent_seen_time";
pub(crate) const DIRECTOR_COLUMNS: &str =
    "id, name, service, mode, router, route_expression, active_active, enabled";
pub(crate) const BACKEND_COLUMNS: &str = "id, director_id, dc_id, address, port, weight, \
     max_connections, connect_timeout_micros, first_byte_timeout_micros, \
     between_bytes_timeout_micros, enabled, tags";
pub(crate) const TASK_COLUMNS: &str = "t.id, t.cluster_id, c.name AS cluster_name, t.timestamp, \
     t.state, t.description, t.error, t.create_time, t.start_time, t.finish_time";

/// A resource stored one row per item in its own table.
pub(crate) trait Stored: Sized {
    /// The table.
    const TABLE: &'static str;
    /// The columns `from_row` reads.
    const COLUMNS: &'static str;
    /// The resource's name in errors, for example "varnish server".
    const RESOURCE: &'static str;
    /// Converts one row.
    fn from_row(row: &AnyRow) -> Result<Self>;
}

macro_rules! stored {
    ($type:ty, $table:literal, $columns:ident, $resource:literal, $convert:ident) => {
        impl Stored for $type {
            const TABLE: &'static str = $table;
            const COLUMNS: &'static str = $columns;
            const RESOURCE: &'static str = $resource;
            fn from_row(row: &AnyRow) -> Result<Self> {
                $convert(row)
            }
        }
    };
}

stored!(Dc, "dcs", DC_COLUMNS, "dc", dc);
stored!(Cluster, "clusters", CLUSTER_COLUMNS, "cluster", cluster);
stored!(
    VclTemplate,
    "vcl_templates",
    TEMPLATE_COLUMNS,
    "vcl template",
    template
);
stored!(
    VarnishServer,
    "varnish_servers",
    SERVER_COLUMNS,
    "varnish server",
    server
);
stored!(
    Director,
    "directors",
    DIRECTOR_COLUMNS,
    "director",
    director
);
stored!(Backend, "backends", BACKEND_COLUMNS, "backend", backend);

/// Converts microseconds since the Unix epoch to a protobuf timestamp.
pub(crate) fn timestamp(micros: i64) -> Timestamp {
    Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
    }
}

/// Converts a protobuf duration to whole microseconds, saturating.
pub(crate) fn duration_micros(duration: &Duration) -> i64 {
    duration
        .seconds
        .saturating_mul(1_000_000)
        .saturating_add(i64::from(duration.nanos / 1000))
}

fn duration(micros: i64) -> Duration {
    Duration {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
    }
}

/// Joins list fields (labels, tags) for storage; the API rejects values with newlines.
pub(crate) fn join_list(values: &[String]) -> String {
    values.join("\n")
}

fn split_list(stored: String) -> Vec<String> {
    stored
        .split('\n')
        .filter(|value| !value.is_empty())
        .map(str::to_owned)
        .collect()
}

fn flag(row: &AnyRow, column: &str) -> Result<bool> {
    Ok(row.try_get::<i64, _>(column)? != 0)
}

fn port(row: &AnyRow, column: &str) -> Result<u32> {
    Ok(u32::try_from(row.try_get::<i64, _>(column)?).unwrap_or_default())
}

pub(crate) fn dc(row: &AnyRow) -> Result<Dc> {
    Ok(Dc {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        symbol: row.try_get("symbol")?,
    })
}

pub(crate) fn cluster(row: &AnyRow) -> Result<Cluster> {
    Ok(Cluster {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        labels: split_list(row.try_get("labels")?),
        partial_reload: flag(row, "partial_reload")?,
        service_mesh_routing: flag(row, "service_mesh_routing")?,
        reload_timestamp: row
            .try_get::<Option<i64>, _>("reload_timestamp")?
            .map(timestamp),
        error_timestamp: row
            .try_get::<Option<i64>, _>("error_timestamp")?
            .map(timestamp),
        last_error: row.try_get("last_error")?,
    })
}

pub(crate) fn template(row: &AnyRow) -> Result<VclTemplate> {
    Ok(VclTemplate {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        content: row.try_get("content")?,
        syntax: row.try_get::<i64, _>("syntax")? as i32,
        comment: row.try_get("comment")?,
    })
}

pub(crate) fn server(row: &AnyRow) -> Result<VarnishServer> {
    Ok(VarnishServer {
        id: row.try_get("id")?,
        address: row.try_get("address")?,
        hostname: row.try_get("hostname")?,
        http_port: Some(port(row, "http_port")?),
        admin_port: Some(port(row, "admin_port")?),
        status: row.try_get::<i64, _>("status")? as i32,
        dc_id: row.try_get("dc_id")?,
        template_id: row.try_get("template_id")?,
        cluster_id: row.try_get("cluster_id")?,
        is_canary: flag(row, "is_canary")?,
        running_vcl_version: row.try_get("running_vcl_version")?,
        agent_seen_time: row
            .try_get::<Option<i64>, _>("agent_seen_time")?
            .map(timestamp),
    })
}

/// Converts a director row; `cluster_ids` are read separately from `director_clusters`.
pub(crate) fn director(row: &AnyRow) -> Result<Director> {
    Ok(Director {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        service: row.try_get("service")?,
        cluster_ids: Vec::new(),
        mode: row.try_get::<i64, _>("mode")? as i32,
        router: row.try_get::<i64, _>("router")? as i32,
        route_expression: row.try_get("route_expression")?,
        active_active: Some(flag(row, "active_active")?),
        enabled: Some(flag(row, "enabled")?),
    })
}

pub(crate) fn backend(row: &AnyRow) -> Result<Backend> {
    Ok(Backend {
        id: row.try_get("id")?,
        director_id: row.try_get("director_id")?,
        dc_id: row.try_get("dc_id")?,
        address: row.try_get("address")?,
        port: Some(port(row, "port")?),
        weight: Some(port(row, "weight")?),
        max_connections: Some(port(row, "max_connections")?),
        connect_timeout: Some(duration(row.try_get("connect_timeout_micros")?)),
        first_byte_timeout: Some(duration(row.try_get("first_byte_timeout_micros")?)),
        between_bytes_timeout: Some(duration(row.try_get("between_bytes_timeout_micros")?)),
        enabled: Some(flag(row, "enabled")?),
        tags: split_list(row.try_get("tags")?),
    })
}

pub(crate) fn task(row: &AnyRow) -> Result<Task> {
    let id: i64 = row.try_get("id")?;
    Ok(Task {
        id,
        name: format!("tasks/{id}"),
        cluster_id: row.try_get("cluster_id")?,
        cluster_name: row.try_get("cluster_name")?,
        state: row.try_get::<i64, _>("state")? as i32,
        timestamp: Some(timestamp(row.try_get("timestamp")?)),
        description: row.try_get("description")?,
        error: row.try_get("error")?,
        create_time: Some(timestamp(row.try_get("create_time")?)),
        start_time: row.try_get::<Option<i64>, _>("start_time")?.map(timestamp),
        finish_time: row.try_get::<Option<i64>, _>("finish_time")?.map(timestamp),
    })
}
