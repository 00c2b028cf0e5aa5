//! The lease of the vaas-scheduler replica that drives reloads.
//!
//! One row holds who leads, in which term and until when. Taking, renewing and releasing it are
//! each one conditional statement, so two replicas can never both hold it: whichever statement
//! the database runs second sees the first one's row and changes nothing. Expiry is measured on
//! the database's clock, never on a replica's, so replicas with skewed clocks still agree on when
//! a lease ran out. Every take starts a new term, one higher than any before it: a number that
//! tells a newer leader's commands from an older one's (a fencing token).

use std::time::Duration;

use crate::clock::now_micros_sql;
use crate::{Result, Store};

/// Who holds the leader lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderLease {
    /// The replica that holds it.
    pub holder: String,
    /// Its term: higher than that of every earlier holder.
    pub term: i64,
    /// How long the lease lasts unless it is renewed.
    pub expires_in: Duration,
}

/// Returns a duration in whole microseconds, as the lease columns count time.
fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

impl Store {
    /// Takes the leader lease for `holder` for `ttl` if nobody holds it (never taken, released or
    /// expired); returns the new term, or `None` while another replica (or an earlier run of
    /// this one) holds it.
    pub async fn acquire_leader_lease(&self, holder: &str, ttl: Duration) -> Result<Option<i64>> {
        let now = now_micros_sql(self.dialect);
        // One statement: the first replica creates the row, later ones take it over only when
        // it is free, and the term grows with every take.
        let term: Option<i64> = sqlx::query_scalar(&format!(
            "INSERT INTO leader_lease (id, holder, term, expires_at) VALUES (1, $1, 1, {now} + $2) \
             ON CONFLICT (id) DO UPDATE SET holder = excluded.holder, \
             term = leader_lease.term + 1, expires_at = excluded.expires_at \
             WHERE leader_lease.holder = '' OR leader_lease.expires_at <= {now} \
             RETURNING term"
        ))
        .bind(holder)
        .bind(micros(ttl))
        .fetch_optional(&self.pool)
        .await?;
        Ok(term)
    }

    /// Extends the lease `holder` took in `term` to `ttl` from now; returns `false` when it no
    /// longer holds it (released, or expired and taken by another replica).
    ///
    /// A lease that expired but that nobody took since is renewed: its holder and term show
    /// that no other replica led in between.
    pub async fn renew_leader_lease(&self, holder: &str, term: i64, ttl: Duration) -> Result<bool> {
        let now = now_micros_sql(self.dialect);
        let renewed = sqlx::query(&format!(
            "UPDATE leader_lease SET expires_at = {now} + $1 \
             WHERE id = 1 AND holder = $2 AND term = $3"
        ))
        .bind(micros(ttl))
        .bind(holder)
        .bind(term)
        .execute(&self.pool)
        .await?;
        Ok(renewed.rows_affected() == 1)
    }

    /// Gives up the lease `holder` took in `term`, so that another replica can take it at once
    /// instead of after it expires; returns `false` when it did not hold it any more.
    pub async fn release_leader_lease(&self, holder: &str, term: i64) -> Result<bool> {
        let now = now_micros_sql(self.dialect);
        let released = sqlx::query(&format!(
            "UPDATE leader_lease SET holder = '', expires_at = {now} \
             WHERE id = 1 AND holder = $1 AND term = $2"
        ))
        .bind(holder)
        .bind(term)
        .execute(&self.pool)
        .await?;
        Ok(released.rows_affected() == 1)
    }

    /// Returns who holds the leader lease, or `None` when nobody does.
    pub async fn leader_lease(&self) -> Result<Option<LeaderLease>> {
        let now = now_micros_sql(self.dialect);
        let row: Option<(String, i64, i64)> = sqlx::query_as(&format!(
            "SELECT holder, term, expires_at - {now} FROM leader_lease \
             WHERE id = 1 AND holder <> '' AND expires_at > {now}"
        ))
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(holder, term, remaining)| LeaderLease {
            holder,
            term,
            expires_in: Duration::from_micros(u64::try_from(remaining).unwrap_or(0)),
        }))
    }
}
