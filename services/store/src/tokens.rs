//! Access tokens: the credentials of API callers (roles reader, editor, admin) and of agents (one
//! Varnish server each).
//!
//! A token's secret is 32 random bytes, shown once when it is created; the store keeps only its
//! SHA-256 hash, so a leaked database does not hand out working credentials. A secret carries
//! 256 bits of entropy, so a fast hash is enough: there is nothing to brute-force. Creating and
//! revoking a token are recorded in the audit history.

use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::Row;
use sqlx::any::AnyRow;
use vaas_proto::v1::{AccessToken, AuditAction, Role};

use crate::audit::{RawEntry, record_raw};
use crate::clock::now_micros_sql;
use crate::resource::{Page, cut_page, page_limit, parse_page_token};
use crate::rows::timestamp;
use crate::{Error, Result, Store};

/// Every secret starts with this, so that a leaked one is easy to recognise (secret scanners).
pub const SECRET_PREFIX: &str = "vaas_";

/// What the store needs to create a token.
#[derive(Clone, Debug)]
pub struct NewToken {
    /// Unique name (case-insensitive); validated by the caller.
    pub name: String,
    /// What the token allows.
    pub role: Role,
    /// For [`Role::Agent`]: the server the token is bound to; 0 otherwise.
    pub varnish_server_id: i64,
    /// How long the token works.
    pub ttl: Duration,
}

/// What a presented secret turned out to be.
#[derive(Clone, Debug, PartialEq)]
pub enum Authentication {
    /// A token that works.
    Valid(AccessToken),
    /// No token has this secret.
    Unknown,
    /// The token expired.
    Expired(AccessToken),
    /// The token was revoked.
    Revoked(AccessToken),
}

impl Authentication {
    /// Returns the token if it works, or why it does not, in words for the caller.
    pub fn valid(self) -> std::result::Result<AccessToken, String> {
        match self {
            Authentication::Valid(token) => Ok(token),
            Authentication::Unknown => Err("the token is not valid".to_owned()),
            Authentication::Expired(token) => Err(format!(
                "token {:?} expired at {}",
                token.name,
                token
                    .expire_time
                    .map(|time| time.to_string())
                    .unwrap_or_default()
            )),
            Authentication::Revoked(token) => Err(format!("token {:?} was revoked", token.name)),
        }
    }
}

/// Returns the hex SHA-256 of a secret, as the store keeps it.
fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Returns a new random secret.
fn new_secret() -> Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).map_err(|error| Error::Random(error.to_string()))?;
    Ok(format!("{SECRET_PREFIX}{}", hex::encode(bytes)))
}

impl Store {
    /// Creates a token and returns it with its secret, which is not kept anywhere.
    pub async fn create_token(&self, new: &NewToken) -> Result<(AccessToken, String)> {
        let secret = new_secret()?;
        let store = self.clone();
        let new = new.clone();
        self.write(move |write| {
            Box::pin(async move {
                let new = &new;
                let tx = &mut write.transaction;
                let taken: Option<i64> = sqlx::query_scalar(
                    "SELECT id FROM access_tokens WHERE lower(name) = lower($1)",
                )
                .bind(&new.name)
                .fetch_optional(&mut **tx)
                .await?;
                if taken.is_some() {
                    return Err(Error::AlreadyExists {
                        field: "name",
                        value: new.name.clone(),
                    });
                }
                if new.role == Role::Agent {
                    let server: Option<i64> =
                        sqlx::query_scalar("SELECT id FROM varnish_servers WHERE id = $1")
                            .bind(new.varnish_server_id)
                            .fetch_optional(&mut **tx)
                            .await?;
                    if server.is_none() {
                        return Err(Error::MissingReference {
                            field: "varnish_server_id",
                            resource: "varnish server",
                            id: new.varnish_server_id,
                        });
                    }
                }
                let now = now_micros_sql(store.dialect);
                let row = sqlx::query(&format!(
            "INSERT INTO access_tokens (name, role, varnish_server_id, secret_hash, created_at, \
             expires_at, created_by) VALUES ($1, $2, $3, $4, {now}, {now} + $5, $6) RETURNING *"
        ))
        .bind(&new.name)
        .bind(new.role as i32 as i64)
        .bind(new.varnish_server_id)
        .bind(secret_hash(&secret))
        .bind(i64::try_from(new.ttl.as_micros()).unwrap_or(i64::MAX))
        .bind(&*store.actor)
        .fetch_one(&mut **tx)
        .await?;
                let token = token(&row)?;
                audit(
                    tx,
                    write.timestamp,
                    &store.actor,
                    AuditAction::Create,
                    None,
                    &token,
                )
                .await?;
                Ok((token, secret))
            })
        })
        .await
    }

    /// Lists tokens in id order.
    pub async fn list_tokens(&self, page_size: i32, page_token: &str) -> Result<Page<AccessToken>> {
        let limit = page_limit(page_size);
        let after = parse_page_token(page_token)?;
        let rows = sqlx::query("SELECT * FROM access_tokens WHERE id > $1 ORDER BY id LIMIT $2")
            .bind(after)
            .bind(limit + 1)
            .fetch_all(&self.pool)
            .await?;
        let (rows, next) = cut_page(rows, limit, |row| row.try_get::<i64, _>("id"));
        Ok((rows.iter().map(token).collect::<Result<_>>()?, next))
    }

    /// Revokes a token (a token revoked before keeps its first revocation time).
    pub async fn revoke_token(&self, id: i64) -> Result<AccessToken> {
        let store = self.clone();
        self.write(move |write| {
            Box::pin(async move {
                let tx = &mut write.transaction;
                let before = sqlx::query("SELECT * FROM access_tokens WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&mut **tx)
                    .await?
                    .ok_or(Error::NotFound {
                        resource: "access token",
                        id,
                    })?;
                let before = token(&before)?;
                if before.revoke_time.is_some() {
                    return Ok(before);
                }
                let now = now_micros_sql(store.dialect);
                let row = sqlx::query(&format!(
                    "UPDATE access_tokens SET revoked_at = {now} WHERE id = $1 RETURNING *"
                ))
                .bind(id)
                .fetch_one(&mut **tx)
                .await?;
                let after = token(&row)?;
                let entry_time = write.timestamp;
                audit(
                    tx,
                    entry_time,
                    &store.actor,
                    AuditAction::Update,
                    Some(&before),
                    &after,
                )
                .await?;
                Ok(after)
            })
        })
        .await
    }

    /// Looks a presented secret up: valid, unknown, expired or revoked.
    pub async fn authenticate(&self, secret: &str) -> Result<Authentication> {
        self.look_up_token("secret_hash = $1", secret_hash(secret))
            .await
    }

    /// Looks a token up again by id (a token in use may have been revoked or expired since).
    pub async fn recheck_token(&self, id: i64) -> Result<Authentication> {
        self.look_up_token("id = $1", id).await
    }

    async fn look_up_token<T>(&self, condition: &str, key: T) -> Result<Authentication>
    where
        T: for<'q> sqlx::Encode<'q, sqlx::Any> + sqlx::Type<sqlx::Any> + Send,
    {
        let now = now_micros_sql(self.dialect);
        let row = sqlx::query(&format!(
            "SELECT *, {now} AS now FROM access_tokens WHERE {condition}"
        ))
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(Authentication::Unknown);
        };
        let token = token(&row)?;
        let now: i64 = row.try_get("now")?;
        let expires_at: i64 = row.try_get("expires_at")?;
        Ok(if token.revoke_time.is_some() {
            Authentication::Revoked(token)
        } else if expires_at <= now {
            Authentication::Expired(token)
        } else {
            Authentication::Valid(token)
        })
    }
}

/// Records a token's creation or revocation in the audit history.
async fn audit(
    tx: &mut crate::Tx<'_>,
    time: i64,
    actor: &str,
    action: AuditAction,
    before: Option<&AccessToken>,
    after: &AccessToken,
) -> Result<()> {
    let entry = RawEntry {
        time,
        actor,
        collection: "access_tokens",
        resource_id: after.id,
        action,
        message_type: "vaas.v1.AccessToken",
    };
    let before = before.map(prost::Message::encode_to_vec);
    record_raw(
        tx,
        &entry,
        before,
        Some(prost::Message::encode_to_vec(after)),
    )
    .await
}

fn token(row: &AnyRow) -> Result<AccessToken> {
    let role: i64 = row.try_get("role")?;
    let revoked_at: Option<i64> = row.try_get("revoked_at")?;
    Ok(AccessToken {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        role: role as i32,
        varnish_server_id: row.try_get("varnish_server_id")?,
        create_time: Some(timestamp(row.try_get("created_at")?)),
        expire_time: Some(timestamp(row.try_get("expires_at")?)),
        revoke_time: revoked_at.map(timestamp),
        created_by: row.try_get("created_by")?,
    })
}
