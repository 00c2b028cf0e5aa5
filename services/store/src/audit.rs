//! The audit history: who changed which resource when, with the resource before and after.
//!
//! Every generic write records its entry inside its own transaction, so the history holds exactly
//! the changes that were committed. Values are kept as the resource's protobuf encoding and come
//! back as `google.protobuf.Any`, which any gRPC client (grpcurl included) can decode.

use prost_types::Any;
use sqlx::Row;
use sqlx::any::AnyRow;
use vaas_proto::v1::{AuditAction, AuditEntry};

use crate::resource::{Page, Resource, Tx, cut_page, page_limit, parse_page_token};
use crate::rows::timestamp;
use crate::{Error, Result, Store};

/// The longest actor kept, in characters.
const ACTOR_MAX_CHARS: usize = 256;

/// Records that `actor` changed an `R` from `before` to `after` at store timestamp `time`.
pub(crate) async fn record<R: Resource>(
    tx: &mut Tx<'_>,
    time: i64,
    actor: &str,
    before: Option<&R>,
    after: Option<&R>,
) -> Result<()> {
    let (action, id) = match (before, after) {
        (None, Some(after)) => (AuditAction::Create, after.id()),
        (Some(before), Some(_)) => (AuditAction::Update, before.id()),
        (Some(before), None) => (AuditAction::Delete, before.id()),
        (None, None) => return Ok(()),
    };
    let entry = RawEntry {
        time,
        actor,
        collection: R::COLLECTION,
        resource_id: id,
        action,
        message_type: R::MESSAGE,
    };
    record_raw(
        tx,
        &entry,
        before.map(prost::Message::encode_to_vec),
        after.map(prost::Message::encode_to_vec),
    )
    .await
}

/// An audit entry of something that is not a generic [`Resource`] (an access token).
pub(crate) struct RawEntry<'a> {
    pub(crate) time: i64,
    pub(crate) actor: &'a str,
    pub(crate) collection: &'static str,
    pub(crate) resource_id: i64,
    pub(crate) action: AuditAction,
    pub(crate) message_type: &'static str,
}

/// Records `entry` with the protobuf encodings of the value before and after.
pub(crate) async fn record_raw(
    tx: &mut Tx<'_>,
    entry: &RawEntry<'_>,
    before: Option<Vec<u8>>,
    after: Option<Vec<u8>>,
) -> Result<()> {
    let actor: String = entry.actor.chars().take(ACTOR_MAX_CHARS).collect();
    sqlx::query(
        "INSERT INTO audit_entries (time, actor, collection, resource_id, action, message_type, \
         before_value, after_value) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(entry.time)
    .bind(actor)
    .bind(entry.collection)
    .bind(entry.resource_id)
    .bind(entry.action as i32 as i64)
    .bind(entry.message_type)
    .bind(before)
    .bind(after)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl Store {
    /// Lists audit entries newest first: of one resource (`"backends/7"`), of one collection
    /// (`"backends"`), or of everything (`""`).
    pub async fn list_audit_entries(
        &self,
        resource: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<Page<AuditEntry>> {
        let limit = page_limit(page_size);
        let before = match parse_page_token(page_token)? {
            0 => i64::MAX,
            id => id,
        };
        let (collection, resource_id) = match resource.split_once('/') {
            Some((collection, id)) => (
                collection,
                Some(id.parse::<i64>().map_err(|_| Error::InvalidResourceName {
                    name: resource.to_owned(),
                })?),
            ),
            None => (resource, None),
        };
        let rows = sqlx::query(
            "SELECT * FROM audit_entries WHERE id < $1 AND ($2 = '' OR collection = $2) \
             AND ($3 = 0 OR resource_id = $3) ORDER BY id DESC LIMIT $4",
        )
        .bind(before)
        .bind(collection)
        .bind(resource_id.unwrap_or(0))
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await?;
        let (rows, next) = cut_page(rows, limit, |row| row.try_get::<i64, _>("id"));
        Ok((rows.iter().map(entry).collect::<Result<_>>()?, next))
    }
}

fn entry(row: &AnyRow) -> Result<AuditEntry> {
    let message_type: String = row.try_get("message_type")?;
    let any = |value: Option<Vec<u8>>| {
        value.map(|value| Any {
            type_url: format!("type.googleapis.com/{message_type}"),
            value,
        })
    };
    let collection: String = row.try_get("collection")?;
    let resource_id: i64 = row.try_get("resource_id")?;
    Ok(AuditEntry {
        id: row.try_get("id")?,
        time: Some(timestamp(row.try_get("time")?)),
        actor: row.try_get("actor")?,
        resource: format!("{collection}/{resource_id}"),
        action: row.try_get::<i64, _>("action")? as i32,
        before: any(row.try_get("before_value")?),
        after: any(row.try_get("after_value")?),
    })
}
