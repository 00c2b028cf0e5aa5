//! Backends: the origin servers of a director, each in a datacenter.

use std::collections::BTreeSet;

use sqlx::Row;
use sqlx::any::AnyRow;
use vaas_proto::v1::{Backend, Dc, Director, ListBackendsRequest};

use crate::resource::{Condition, Resource, Tx, Value, ids_for_each};
use crate::rows::{duration_column, flag, join_list, micros, port, split_list};
use crate::{Error, Result};

impl Resource for Backend {
    const TABLE: &'static str = "backends";
    const COLLECTION: &'static str = "backends";
    const MESSAGE: &'static str = "vaas.v1.Backend";
    const KIND: &'static str = "backend";
    const FIELD: &'static str = "backend";
    type Filter = ListBackendsRequest;

    fn id(&self) -> i64 {
        self.id
    }

    fn set_id(&mut self, id: i64) {
        self.id = id;
    }

    fn columns(&self) -> Vec<(&'static str, Value)> {
        vec![
            ("director_id", self.director_id.into()),
            ("dc_id", self.dc_id.into()),
            ("address", (&self.address).into()),
            ("port", self.port.unwrap_or_default().into()),
            ("weight", self.weight.unwrap_or_default().into()),
            (
                "max_connections",
                self.max_connections.unwrap_or_default().into(),
            ),
            ("connect_timeout_micros", micros(&self.connect_timeout)),
            (
                "first_byte_timeout_micros",
                micros(&self.first_byte_timeout),
            ),
            (
                "between_bytes_timeout_micros",
                micros(&self.between_bytes_timeout),
            ),
            ("enabled", self.enabled.unwrap_or(true).into()),
            ("tags", Value::Text(join_list(&self.tags))),
            ("inherit_time_profile", self.inherit_time_profile.into()),
        ]
    }

    fn from_row(row: &AnyRow) -> Result<Backend> {
        Ok(Backend {
            id: row.try_get("id")?,
            director_id: row.try_get("director_id")?,
            dc_id: row.try_get("dc_id")?,
            address: row.try_get("address")?,
            port: Some(port(row, "port")?),
            weight: Some(port(row, "weight")?),
            max_connections: Some(port(row, "max_connections")?),
            connect_timeout: duration_column(row, "connect_timeout_micros")?,
            first_byte_timeout: duration_column(row, "first_byte_timeout_micros")?,
            between_bytes_timeout: duration_column(row, "between_bytes_timeout_micros")?,
            enabled: Some(flag(row, "enabled")?),
            tags: split_list(row.try_get("tags")?),
            inherit_time_profile: flag(row, "inherit_time_profile")?,
        })
    }

    fn conditions(filter: &ListBackendsRequest) -> Vec<Condition> {
        let mut conditions = Vec::new();
        if filter.director_id != 0 {
            conditions.push(Condition::new("director_id = ?", filter.director_id));
        }
        if filter.dc_id != 0 {
            conditions.push(Condition::new("dc_id = ?", filter.dc_id));
        }
        if let Some(enabled) = filter.enabled {
            conditions.push(Condition::new("enabled = ?", enabled));
        }
        if !filter.tag.is_empty() {
            conditions.push(Condition::list_contains("tags", &filter.tag));
        }
        if !filter.address_prefix.is_empty() {
            conditions.push(Condition::starts_with("address", &filter.address_prefix));
        }
        conditions
    }

    /// The director and the datacenter must exist and the (address, port) be free within the
    /// director: one query, since the write holds the store clock meanwhile.
    async fn check(&self, tx: &mut Tx<'_>) -> Result<()> {
        let port = i64::from(self.port.unwrap_or_default());
        let (directors, dcs, taken): (i64, i64, Option<i64>) = sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM directors WHERE id = $1), \
             (SELECT COUNT(*) FROM dcs WHERE id = $2), \
             (SELECT MIN(id) FROM backends WHERE address = $3 AND port = $4 \
             AND director_id = $1 AND id <> $5)",
        )
        .bind(self.director_id)
        .bind(self.dc_id)
        .bind(&self.address)
        .bind(port)
        .bind(self.id)
        .fetch_one(&mut **tx)
        .await?;
        if directors == 0 {
            return Err(Error::MissingReference {
                field: "backend.director_id",
                resource: Director::KIND,
                id: self.director_id,
            });
        }
        if dcs == 0 {
            return Err(Error::MissingReference {
                field: "backend.dc_id",
                resource: Dc::KIND,
                id: self.dc_id,
            });
        }
        if taken.is_some() {
            return Err(Error::AlreadyExists {
                field: "backend.address",
                value: format!("{} port {port}", self.address),
            });
        }
        Ok(())
    }

    /// The clusters of the director the backend belonged to and of the one it belongs to now.
    async fn affected(
        tx: &mut Tx<'_>,
        before: Option<&Backend>,
        after: Option<&Backend>,
    ) -> Result<BTreeSet<i64>> {
        let directors = before
            .into_iter()
            .chain(after)
            .map(|backend| backend.director_id);
        ids_for_each(
            tx,
            "SELECT cluster_id FROM director_clusters WHERE director_id = $1",
            directors,
        )
        .await
    }
}
