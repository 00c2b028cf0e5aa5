//! Reload tasks, the outbox of intents to publish, and what agents report about their servers.

use sqlx::{Any, Transaction};
use vaas_proto::v1::{ServerStatus, Task, TaskState};

use crate::clock::now_micros_sql;
use crate::resource::{cut_page, page_limit, parse_page_token};
use crate::rows::{self, TASK_COLUMNS};
use crate::{Dialect, Error, Result, Store};

/// The longest last error a cluster keeps, in characters.
pub const LAST_ERROR_MAX_CHARS: usize = 400;

/// The longest error a task keeps, in characters: enough for a compiler's message, small enough
/// to travel in a gRPC status (whose trailers HTTP/2 peers cap at a few KiB).
pub const TASK_ERROR_MAX_CHARS: usize = 2000;

/// States in which a task still waits for a reload.
const UNFINISHED_STATES: &str = "1, 2, 5";

/// An intent waiting in the outbox to be published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutboxEntry {
    /// Outbox row id.
    pub id: i64,
    /// The task the intent stands for; also the message id that deduplicates re-publishing.
    pub task_id: i64,
    /// The cluster to reload.
    pub cluster_id: i64,
    /// The task's store timestamp.
    pub timestamp: i64,
}

/// How a reload ended for the tasks it applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskOutcome {
    /// Every affected server runs the new VCL.
    Success,
    /// The reload failed; the message says why (the compiler's message, an unreachable server).
    Failure(String),
    /// The reload failed for a transient reason and will be tried again: the tasks wait in
    /// state RETRY with the message, unfinished.
    Retry(String),
}

/// A page of tasks, newest first, and the token of the next page (empty on the last page).
pub type TaskPage = (Vec<Task>, String);

/// Creates a PENDING task and its outbox row for `cluster_id` when the cluster has a server to
/// reload, and returns the task as stored (`None`: no server, no task). On PostgreSQL this is one
/// statement, one round trip while the write holds the store clock; SQLite runs in-process and
/// takes the steps one by one.
pub(crate) async fn create_for_served_cluster(
    transaction: &mut Transaction<'_, Any>,
    dialect: Dialect,
    cluster_id: i64,
    timestamp: i64,
    description: &str,
) -> Result<Option<Task>> {
    let disabled = ServerStatus::Disabled as i32 as i64;
    let pending = TaskState::Pending as i32 as i64;
    if dialect == Dialect::Postgres {
        let now = now_micros_sql(dialect);
        let row = sqlx::query(&format!(
            "WITH served AS (SELECT 1 FROM varnish_servers WHERE cluster_id = $1 AND status <> $2 \
             LIMIT 1), \
             t AS (INSERT INTO tasks (cluster_id, timestamp, state, description, create_time) \
             SELECT $1, $3, $4, $5, {now} FROM served RETURNING *), \
             queued AS (INSERT INTO outbox (task_id, cluster_id, timestamp) \
             SELECT id, cluster_id, timestamp FROM t) \
             SELECT {TASK_COLUMNS} FROM t JOIN clusters c ON c.id = t.cluster_id"
        ))
        .bind(cluster_id)
        .bind(disabled)
        .bind(timestamp)
        .bind(pending)
        .bind(description)
        .fetch_optional(&mut **transaction)
        .await?;
        return row.as_ref().map(rows::task).transpose();
    }
    let served: Option<i64> = sqlx::query_scalar(
        "SELECT id FROM varnish_servers WHERE cluster_id = $1 AND status <> $2 LIMIT 1",
    )
    .bind(cluster_id)
    .bind(disabled)
    .fetch_optional(&mut **transaction)
    .await?;
    if served.is_none() {
        return Ok(None);
    }
    let task_id = create(transaction, dialect, cluster_id, timestamp, description).await?;
    Ok(by_ids(transaction, &[task_id]).await?.pop())
}

/// Inserts a PENDING task and its outbox row; returns the task id.
async fn create(
    transaction: &mut Transaction<'_, Any>,
    dialect: Dialect,
    cluster_id: i64,
    timestamp: i64,
    description: &str,
) -> Result<i64> {
    let now = now_micros_sql(dialect);
    let task_id: i64 = sqlx::query_scalar(&format!(
        "INSERT INTO tasks (cluster_id, timestamp, state, description, create_time) \
         VALUES ($1, $2, $3, $4, {now}) RETURNING id"
    ))
    .bind(cluster_id)
    .bind(timestamp)
    .bind(TaskState::Pending as i32 as i64)
    .bind(description)
    .fetch_one(&mut **transaction)
    .await?;
    sqlx::query("INSERT INTO outbox (task_id, cluster_id, timestamp) VALUES ($1, $2, $3)")
        .bind(task_id)
        .bind(cluster_id)
        .bind(timestamp)
        .execute(&mut **transaction)
        .await?;
    Ok(task_id)
}

/// Reads tasks by id, in id order.
pub(crate) async fn by_ids(
    transaction: &mut Transaction<'_, Any>,
    ids: &[i64],
) -> Result<Vec<Task>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let list = id_list(ids);
    let rows = sqlx::query(&format!(
        "SELECT {TASK_COLUMNS} FROM tasks t JOIN clusters c ON c.id = t.cluster_id \
         WHERE t.id IN ({list}) ORDER BY t.id"
    ))
    .fetch_all(&mut **transaction)
    .await?;
    rows.iter().map(rows::task).collect()
}

/// Formats ids (integers, never user text) as an SQL list.
fn id_list(ids: &[i64]) -> String {
    ids.iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// How a server's varnishd is set up, as its agent reports it.
#[derive(Clone, Copy, Debug)]
pub struct VarnishSettings<'a> {
    /// What makes it unsafe for configuration from VaaS, one finding each.
    pub unsafe_settings: &'a [String],
    /// Its `cc_command` parameter.
    pub cc_command: &'a str,
}

impl Store {
    /// Returns one task, with each server's progress in the reload that last included it.
    pub async fn get_task(&self, id: i64) -> Result<Task> {
        let mut transaction = self.pool.begin().await?;
        let mut task = by_ids(&mut transaction, &[id])
            .await?
            .pop()
            .ok_or(Error::NotFound {
                resource: "task",
                id,
            })?;
        task.servers = crate::progress::of_task(&mut transaction, id).await?;
        transaction.commit().await?;
        Ok(task)
    }

    /// Returns the tasks with these ids that exist, in id order.
    pub async fn get_tasks(&self, ids: &[i64]) -> Result<Vec<Task>> {
        let mut transaction = self.pool.begin().await?;
        by_ids(&mut transaction, ids).await
    }

    /// Lists tasks newest first, optionally of one cluster and in one state (0 = any).
    pub async fn list_tasks(
        &self,
        page_size: i32,
        page_token: &str,
        cluster_id: i64,
        state: i32,
    ) -> Result<TaskPage> {
        let limit = page_limit(page_size);
        let before = match parse_page_token(page_token)? {
            0 => i64::MAX,
            id => id,
        };
        let mut filter = String::new();
        if cluster_id != 0 {
            filter.push_str(&format!(" AND t.cluster_id = {cluster_id}"));
        }
        if state != 0 {
            filter.push_str(&format!(" AND t.state = {state}"));
        }
        let rows = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks t JOIN clusters c ON c.id = t.cluster_id \
             WHERE t.id < $1{filter} ORDER BY t.id DESC LIMIT $2"
        ))
        .bind(before)
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await?;
        let (rows, next) = cut_page(rows, limit, |row| sqlx::Row::try_get::<i64, _>(row, "id"));
        Ok((rows.iter().map(rows::task).collect::<Result<_>>()?, next))
    }

    /// Returns, per cluster with unfinished tasks, the newest unfinished task's timestamp.
    pub async fn unfinished_clusters(&self) -> Result<Vec<(i64, i64)>> {
        let rows: Vec<(i64, i64)> = sqlx::query_as(&format!(
            "SELECT cluster_id, MAX(timestamp) FROM tasks WHERE state IN ({UNFINISHED_STATES}) \
             GROUP BY cluster_id ORDER BY cluster_id"
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// Marks the unfinished tasks of a cluster up to `up_to` as STARTED by the reload of
    /// snapshot `up_to` (whose progress they show from now on); returns them.
    pub async fn start_tasks(&self, cluster_id: i64, up_to: i64) -> Result<Vec<Task>> {
        let now = now_micros_sql(self.dialect);
        let mut transaction = self.pool.begin().await?;
        self.check_fence(&mut transaction).await?;
        let ids: Vec<i64> = sqlx::query_scalar(&format!(
            "UPDATE tasks SET state = $1, start_time = COALESCE(start_time, {now}), \
             reload_version = $3 \
             WHERE cluster_id = $2 AND timestamp <= $3 AND state IN ({UNFINISHED_STATES}) \
             RETURNING id"
        ))
        .bind(TaskState::Started as i32 as i64)
        .bind(cluster_id)
        .bind(up_to)
        .fetch_all(&mut *transaction)
        .await?;
        let tasks = by_ids(&mut transaction, &ids).await?;
        transaction.commit().await?;
        Ok(tasks)
    }

    /// Finishes every unfinished task of a cluster up to `up_to` and records the outcome on the
    /// cluster (reload timestamp, or error timestamp and last error); returns the tasks.
    pub async fn finish_tasks(
        &self,
        cluster_id: i64,
        up_to: i64,
        outcome: &TaskOutcome,
    ) -> Result<Vec<Task>> {
        let now = now_micros_sql(self.dialect);
        let (state, error) = match outcome {
            TaskOutcome::Success => (TaskState::Success, String::new()),
            TaskOutcome::Failure(error) => (
                TaskState::Failure,
                error.chars().take(TASK_ERROR_MAX_CHARS).collect(),
            ),
            TaskOutcome::Retry(error) => (
                TaskState::Retry,
                error.chars().take(TASK_ERROR_MAX_CHARS).collect(),
            ),
        };
        // A task waiting for a retry is not finished.
        let finish_time = if state == TaskState::Retry {
            "NULL".to_owned()
        } else {
            now.to_owned()
        };
        let mut transaction = self.pool.begin().await?;
        self.check_fence(&mut transaction).await?;
        let ids: Vec<i64> = sqlx::query_scalar(&format!(
            "UPDATE tasks SET state = $1, error = $2, finish_time = {finish_time}, \
             start_time = COALESCE(start_time, {now}) \
             WHERE cluster_id = $3 AND timestamp <= $4 AND state IN ({UNFINISHED_STATES}) \
             RETURNING id"
        ))
        .bind(state as i32 as i64)
        .bind(&error)
        .bind(cluster_id)
        .bind(up_to)
        .fetch_all(&mut *transaction)
        .await?;
        let tasks = by_ids(&mut transaction, &ids).await?;
        let newest: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT MAX(timestamp) FROM tasks WHERE id IN ({})",
            if ids.is_empty() {
                "0".to_owned()
            } else {
                id_list(&ids)
            }
        ))
        .fetch_one(&mut *transaction)
        .await?;
        if let Some(newest) = newest {
            match outcome {
                TaskOutcome::Success => {
                    sqlx::query(
                        "UPDATE clusters SET reload_timestamp = $1 WHERE id = $2 \
                         AND (reload_timestamp IS NULL OR reload_timestamp < $1)",
                    )
                    .bind(newest)
                    .bind(cluster_id)
                    .execute(&mut *transaction)
                    .await?;
                }
                TaskOutcome::Failure(error) | TaskOutcome::Retry(error) => {
                    let last_error: String = error.chars().take(LAST_ERROR_MAX_CHARS).collect();
                    sqlx::query(
                        "UPDATE clusters SET error_timestamp = $1, last_error = $2 WHERE id = $3",
                    )
                    .bind(newest)
                    .bind(last_error)
                    .bind(cluster_id)
                    .execute(&mut *transaction)
                    .await?;
                }
            }
        }
        transaction.commit().await?;
        Ok(tasks)
    }

    /// Returns up to `limit` outbox entries, oldest first.
    pub async fn pending_outbox(&self, limit: i64) -> Result<Vec<OutboxEntry>> {
        let rows: Vec<(i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT id, task_id, cluster_id, timestamp FROM outbox ORDER BY id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, task_id, cluster_id, timestamp)| OutboxEntry {
                id,
                task_id,
                cluster_id,
                timestamp,
            })
            .collect())
    }

    /// Removes a published outbox entry.
    pub async fn delete_outbox(&self, id: i64) -> Result<()> {
        sqlx::query("DELETE FROM outbox WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Refuses the transaction's task writes when this handle is fenced to a term that no longer
    /// holds the leader lease. On PostgreSQL the lease row stays share-locked until the
    /// transaction ends, so a new leader takes the lease only after this write; on SQLite a take
    /// committed meanwhile makes this transaction's first write fail.
    async fn check_fence(&self, transaction: &mut sqlx::Transaction<'_, sqlx::Any>) -> Result<()> {
        let Some(term) = self.fence else {
            return Ok(());
        };
        let lock = match self.dialect {
            crate::Dialect::Postgres => " FOR SHARE",
            crate::Dialect::Sqlite => "",
        };
        let current: Option<i64> =
            sqlx::query_scalar(&format!("SELECT term FROM leader_lease WHERE id = 1{lock}"))
                .fetch_optional(&mut **transaction)
                .await?;
        match current {
            Some(current) if current != term => Err(crate::Error::Fenced { term, current }),
            _ => Ok(()),
        }
    }

    /// Records what a reload of configuration `version` left each server running, in one
    /// transaction: for a server without an error, that it runs `version`; for one with an error,
    /// why it failed (the version it runs stays).
    pub async fn record_server_syncs(
        &self,
        version: i64,
        syncs: &[(i64, Option<&str>)],
    ) -> Result<()> {
        let synced: Vec<i64> = syncs
            .iter()
            .filter(|(_, error)| error.is_none())
            .map(|(server_id, _)| *server_id)
            .collect();
        let mut transaction = self.pool.begin().await?;
        if !synced.is_empty() {
            sqlx::query(&format!(
                "UPDATE varnish_servers SET synced_version = $1, sync_error = '' WHERE id IN ({})",
                id_list(&synced)
            ))
            .bind(version)
            .execute(&mut *transaction)
            .await?;
        }
        for (server_id, error) in syncs {
            let Some(error) = error else { continue };
            sqlx::query("UPDATE varnish_servers SET sync_error = $1 WHERE id = $2")
                .bind(error.chars().take(LAST_ERROR_MAX_CHARS).collect::<String>())
                .bind(server_id)
                .execute(&mut *transaction)
                .await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    /// Records whether the agent of the server at (`address`, `admin_port`) is attached to the
    /// leading scheduler.
    pub async fn record_agent_attached(
        &self,
        address: &str,
        admin_port: u32,
        attached: bool,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE varnish_servers SET agent_attached = $1 WHERE address = $2 AND admin_port = $3",
        )
        .bind(i64::from(attached))
        .bind(address)
        .bind(i64::from(admin_port))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Marks every server's agent detached but those of `attached` (address, admin port): a new
    /// leader's view, since agents of a previous leader may be gone.
    pub async fn reset_agents_attached(&self, attached: &[(String, u32)]) -> Result<()> {
        let mut transaction = self.pool.begin().await?;
        sqlx::query("UPDATE varnish_servers SET agent_attached = 0")
            .execute(&mut *transaction)
            .await?;
        for (address, admin_port) in attached {
            sqlx::query(
                "UPDATE varnish_servers SET agent_attached = 1 WHERE address = $1 AND admin_port = $2",
            )
            .bind(address)
            .bind(i64::from(*admin_port))
            .execute(&mut *transaction)
            .await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    /// Records what the agent of the server at (`address`, `admin_port`) reports it runs;
    /// returns the server's id, or `None` when no such server is registered.
    pub async fn record_agent_report(
        &self,
        address: &str,
        admin_port: u32,
        running_vcl_version: &str,
        settings: &VarnishSettings<'_>,
    ) -> Result<Option<i64>> {
        let now = now_micros_sql(self.dialect);
        let id: Option<i64> = sqlx::query_scalar(&format!(
            "UPDATE varnish_servers SET running_vcl_version = $1, agent_seen_time = {now}, agent_attached = 1, \
             unsafe_settings = $4, cc_command = $5 WHERE address = $2 AND admin_port = $3 RETURNING id"
        ))
        .bind(running_vcl_version)
        .bind(address)
        .bind(i64::from(admin_port))
        .bind(crate::rows::join_list(settings.unsafe_settings))
        .bind(settings.cc_command)
        .fetch_optional(&self.pool)
        .await?;
        Ok(id)
    }
}
