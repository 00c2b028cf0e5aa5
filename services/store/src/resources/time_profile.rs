//! Time profiles: connection limits and timeouts that a director's backends can inherit.

use std::collections::BTreeSet;

use sqlx::Row;
use sqlx::any::AnyRow;
use vaas_proto::v1::{Director, ListTimeProfilesRequest, TimeProfile};

use crate::Result;
use crate::resource::{
    Condition, Resource, Tx, Value, clusters_of_directors_with, ensure_unique, ensure_unused,
    name_prefix, updated,
};
use crate::rows::{duration_column, micros, port};

impl Resource for TimeProfile {
    const TABLE: &'static str = "time_profiles";
    const COLLECTION: &'static str = "time_profiles";
    const MESSAGE: &'static str = "vaas.v1.TimeProfile";
    const KIND: &'static str = "time profile";
    const FIELD: &'static str = "time_profile";
    type Filter = ListTimeProfilesRequest;

    fn id(&self) -> i64 {
        self.id
    }

    fn set_id(&mut self, id: i64) {
        self.id = id;
    }

    fn columns(&self) -> Vec<(&'static str, Value)> {
        vec![
            ("name", (&self.name).into()),
            ("description", (&self.description).into()),
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
            (
                "service_mesh_timeout_micros",
                micros(&self.service_mesh_timeout),
            ),
        ]
    }

    fn from_row(row: &AnyRow) -> Result<TimeProfile> {
        Ok(TimeProfile {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            description: row.try_get("description")?,
            max_connections: Some(port(row, "max_connections")?),
            connect_timeout: duration_column(row, "connect_timeout_micros")?,
            first_byte_timeout: duration_column(row, "first_byte_timeout_micros")?,
            between_bytes_timeout: duration_column(row, "between_bytes_timeout_micros")?,
            service_mesh_timeout: duration_column(row, "service_mesh_timeout_micros")?,
        })
    }

    fn conditions(filter: &ListTimeProfilesRequest) -> Vec<Condition> {
        name_prefix(&filter.name_prefix)
    }

    async fn check(&self, tx: &mut Tx<'_>) -> Result<()> {
        ensure_unique(tx, self, "name", &self.name, "time_profile.name").await
    }

    /// A changed profile reloads the clusters of the directors that use it (their inheriting
    /// backends change); a new one is used by none yet, and one in use cannot be deleted.
    async fn affected(
        tx: &mut Tx<'_>,
        before: Option<&TimeProfile>,
        after: Option<&TimeProfile>,
    ) -> Result<BTreeSet<i64>> {
        match updated(before, after) {
            Some(after) => clusters_of_directors_with(tx, "time_profile_id", after.id).await,
            None => Ok(BTreeSet::new()),
        }
    }

    async fn before_delete(&self, tx: &mut Tx<'_>) -> Result<()> {
        ensure_unused::<TimeProfile, Director>(tx, self, "time_profile_id").await
    }
}
