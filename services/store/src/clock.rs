//! The store clock: task timestamps that strictly increase across every API replica.
//!
//! A timestamp is the database's wall clock in microseconds, or the previous timestamp plus one
//! when the wall clock has not moved on (or went backwards). It is taken by updating a single row
//! at the start of every write transaction, so writers serialise on that row: transactions commit
//! in timestamp order, and a snapshot that sees timestamp T sees every change up to T.

use sqlx::{Any, Transaction};

use crate::{Dialect, Result};

/// Returns the database's current time in microseconds since the Unix epoch, as SQL.
pub(crate) fn now_micros_sql(dialect: Dialect) -> &'static str {
    match dialect {
        Dialect::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS BIGINT)",
        Dialect::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)",
    }
}

/// Takes the next store timestamp inside `transaction`; the row stays locked until it ends.
pub(crate) async fn tick(transaction: &mut Transaction<'_, Any>, dialect: Dialect) -> Result<i64> {
    let now = now_micros_sql(dialect);
    let sql = format!(
        "UPDATE vaas_clock SET value = CASE WHEN value + 1 > {now} THEN value + 1 ELSE {now} END \
         WHERE id = 1 RETURNING value"
    );
    let value: i64 = sqlx::query_scalar(&sql)
        .fetch_one(&mut **transaction)
        .await?;
    Ok(value)
}

/// Reads the newest timestamp handed out so far.
pub(crate) async fn current(transaction: &mut Transaction<'_, Any>) -> Result<i64> {
    let value: i64 = sqlx::query_scalar("SELECT value FROM vaas_clock WHERE id = 1")
        .fetch_one(&mut **transaction)
        .await?;
    Ok(value)
}
