//! Where each server stands in the newest reloads of its cluster: one row per (cluster, reload
//! version, server), written by the scheduler as phases change and read with a task or cluster.

use sqlx::Row;
use sqlx::any::AnyRow;
use vaas_proto::v1::ServerReloadProgress;

use crate::rows::{duration, duration_micros, timestamp, timestamp_micros};
use crate::tasks::LAST_ERROR_MAX_CHARS;
use crate::{Result, Store};

/// How many reloads of a cluster keep their per-server progress; older ones are removed.
pub const KEPT_RELOADS_PER_CLUSTER: i64 = 20;

/// One server's progress in the reload of `cluster_id` at snapshot `version`.
#[derive(Clone, Debug, PartialEq)]
pub struct ReloadProgressRow {
    /// The cluster reloaded.
    pub cluster_id: i64,
    /// The store timestamp of the reload's snapshot.
    pub version: i64,
    /// Where the server stands.
    pub progress: ServerReloadProgress,
}

const PROGRESS_COLUMNS: &str = "server_id, address, phase, render_micros, compile_micros, \
     activate_micros, unchanged, error, update_time";

fn progress(row: &AnyRow) -> Result<ServerReloadProgress> {
    let optional_duration =
        |column: &str| -> Result<_> { Ok(row.try_get::<Option<i64>, _>(column)?.map(duration)) };
    Ok(ServerReloadProgress {
        varnish_server_id: row.try_get("server_id")?,
        address: row.try_get("address")?,
        phase: row.try_get::<i64, _>("phase")? as i32,
        render_duration: optional_duration("render_micros")?,
        compile_duration: optional_duration("compile_micros")?,
        activate_duration: optional_duration("activate_micros")?,
        unchanged: crate::rows::flag(row, "unchanged")?,
        error: row.try_get("error")?,
        update_time: Some(timestamp(row.try_get("update_time")?)),
    })
}

fn micros_of(duration: &Option<prost_types::Duration>) -> Option<i64> {
    duration.as_ref().map(duration_micros)
}

impl Store {
    /// Writes these progress rows (each replacing the row of its cluster, version and server) in
    /// one transaction, and removes the progress of all but the newest reloads of each cluster.
    pub async fn record_reload_progress(&self, rows: &[ReloadProgressRow]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut transaction = self.pool.begin().await?;
        for row in rows {
            let progress = &row.progress;
            sqlx::query(&format!(
                "INSERT INTO reload_progress (cluster_id, version, {PROGRESS_COLUMNS}) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
                 ON CONFLICT (cluster_id, version, server_id) DO UPDATE SET \
                 address = excluded.address, phase = excluded.phase, \
                 render_micros = excluded.render_micros, compile_micros = excluded.compile_micros, \
                 activate_micros = excluded.activate_micros, unchanged = excluded.unchanged, \
                 error = excluded.error, update_time = excluded.update_time"
            ))
            .bind(row.cluster_id)
            .bind(row.version)
            .bind(progress.varnish_server_id)
            .bind(&progress.address)
            .bind(i64::from(progress.phase))
            .bind(micros_of(&progress.render_duration))
            .bind(micros_of(&progress.compile_duration))
            .bind(micros_of(&progress.activate_duration))
            .bind(i64::from(progress.unchanged))
            .bind(
                progress
                    .error
                    .chars()
                    .take(LAST_ERROR_MAX_CHARS)
                    .collect::<String>(),
            )
            .bind(progress.update_time.as_ref().map_or(0, timestamp_micros))
            .execute(&mut *transaction)
            .await?;
        }
        let mut clusters: Vec<i64> = rows.iter().map(|row| row.cluster_id).collect();
        clusters.sort_unstable();
        clusters.dedup();
        for cluster_id in clusters {
            sqlx::query(
                "DELETE FROM reload_progress WHERE cluster_id = $1 AND version < \
                 (SELECT MIN(version) FROM (SELECT DISTINCT version FROM reload_progress \
                 WHERE cluster_id = $1 ORDER BY version DESC LIMIT $2) AS newest)",
            )
            .bind(cluster_id)
            .bind(KEPT_RELOADS_PER_CLUSTER)
            .execute(&mut *transaction)
            .await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    /// Returns the store timestamp of a cluster's newest reload (its snapshot's version) and
    /// each server's progress in it, in server id order; `None` when no reload progress is kept
    /// for the cluster.
    pub async fn newest_reload_progress(
        &self,
        cluster_id: i64,
    ) -> Result<Option<(prost_types::Timestamp, Vec<ServerReloadProgress>)>> {
        let newest: Option<i64> =
            sqlx::query_scalar("SELECT MAX(version) FROM reload_progress WHERE cluster_id = $1")
                .bind(cluster_id)
                .fetch_one(&self.pool)
                .await?;
        let Some(version) = newest else {
            return Ok(None);
        };
        let rows = sqlx::query(&format!(
            "SELECT {PROGRESS_COLUMNS} FROM reload_progress \
             WHERE cluster_id = $1 AND version = $2 ORDER BY server_id"
        ))
        .bind(cluster_id)
        .bind(version)
        .fetch_all(&self.pool)
        .await?;
        Ok(Some((
            timestamp(version),
            rows.iter().map(progress).collect::<Result<_>>()?,
        )))
    }
}

/// Returns each server's progress in the reload that last included task `task_id`, in server
/// id order; empty before the task's first reload started.
pub(crate) async fn of_task(
    transaction: &mut sqlx::Transaction<'_, sqlx::Any>,
    task_id: i64,
) -> Result<Vec<ServerReloadProgress>> {
    let rows = sqlx::query(&format!(
        "SELECT {PROGRESS_COLUMNS} FROM reload_progress WHERE (cluster_id, version) = \
         (SELECT cluster_id, reload_version FROM tasks WHERE id = $1) ORDER BY server_id"
    ))
    .bind(task_id)
    .fetch_all(&mut **transaction)
    .await?;
    rows.iter().map(progress).collect()
}
