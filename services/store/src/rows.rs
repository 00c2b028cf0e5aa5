//! Conversions between column values and message fields that several resources share, and the
//! task row.

use prost_types::{Duration, Timestamp};
use sqlx::Row;
use sqlx::any::AnyRow;
use vaas_proto::v1::Task;

use crate::Result;

pub(crate) const TASK_COLUMNS: &str = "t.id, t.cluster_id, c.name AS cluster_name, t.timestamp, \
     t.state, t.description, t.error, t.create_time, t.start_time, t.finish_time";

/// Converts microseconds since the Unix epoch to a protobuf timestamp.
pub(crate) fn timestamp(micros: i64) -> Timestamp {
    Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
    }
}

/// Converts a protobuf timestamp to whole microseconds since the Unix epoch, saturating.
pub(crate) fn timestamp_micros(time: &Timestamp) -> i64 {
    time.seconds
        .saturating_mul(1_000_000)
        .saturating_add(i64::from(time.nanos / 1000))
}

/// Converts a protobuf duration to whole microseconds, saturating.
pub(crate) fn duration_micros(duration: &Duration) -> i64 {
    duration
        .seconds
        .saturating_mul(1_000_000)
        .saturating_add(i64::from(duration.nanos / 1000))
}

pub(crate) fn duration(micros: i64) -> Duration {
    Duration {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
    }
}

/// Returns an optional duration's column value in whole microseconds (0 when unset).
pub(crate) fn micros(duration: &Option<Duration>) -> crate::resource::Value {
    crate::resource::Value::Int(duration.as_ref().map(duration_micros).unwrap_or_default())
}

/// Reads a duration column stored in microseconds.
pub(crate) fn duration_column(row: &AnyRow, column: &str) -> Result<Option<Duration>> {
    Ok(Some(duration(row.try_get(column)?)))
}

/// Joins list fields (labels, tags) for storage; the API rejects values with newlines.
pub(crate) fn join_list(values: &[String]) -> String {
    values.join("\n")
}

pub(crate) fn split_list(stored: String) -> Vec<String> {
    stored
        .split('\n')
        .filter(|value| !value.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Stores a list of messages (route conditions, redirect assertions) as one hex-encoded protobuf
/// message a line: structured values in one text column that both stores hold alike.
pub(crate) fn encode_messages<M: prost::Message>(messages: &[M]) -> String {
    let lines: Vec<String> = messages
        .iter()
        .map(|message| hex::encode(message.encode_to_vec()))
        .collect();
    join_list(&lines)
}

/// Reads what [`encode_messages`] stored; `what` names the messages in the error.
pub(crate) fn decode_messages<M: prost::Message + Default>(
    stored: &str,
    what: &str,
) -> Result<Vec<M>> {
    let corrupt = |line: &str, error: String| {
        crate::Error::Database(sqlx::Error::Decode(
            format!("stored {what} {line:?}: {error}").into(),
        ))
    };
    split_list(stored.to_owned())
        .iter()
        .map(|line| {
            let bytes = hex::decode(line).map_err(|error| corrupt(line, error.to_string()))?;
            M::decode(bytes.as_slice()).map_err(|error| corrupt(line, error.to_string()))
        })
        .collect()
}

pub(crate) fn flag(row: &AnyRow, column: &str) -> Result<bool> {
    Ok(row.try_get::<i64, _>(column)? != 0)
}

pub(crate) fn port(row: &AnyRow, column: &str) -> Result<u32> {
    Ok(u32::try_from(row.try_get::<i64, _>(column)?).unwrap_or_default())
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
        servers: Vec::new(),
    })
}
