//! Clusters: groups of Varnish servers that are reloaded together; the store also keeps each
//! cluster's reload status here (written by the scheduler, never by a configuration change).

use std::collections::BTreeSet;

use sqlx::Row;
use sqlx::any::AnyRow;
use vaas_proto::v1::{Cluster, ListClustersRequest, VarnishServer};

use crate::Result;
use crate::resource::{Condition, Resource, Tx, Value, ensure_unique, ensure_unused, name_prefix};
use crate::rows::{flag, join_list, split_list, timestamp};

impl Resource for Cluster {
    const TABLE: &'static str = "clusters";
    const COLLECTION: &'static str = "clusters";
    const MESSAGE: &'static str = "vaas.v1.Cluster";
    const KIND: &'static str = "cluster";
    const FIELD: &'static str = "cluster";
    // Its labels fill the placeholders of dynamic domain mappings.
    const CHANGES_ROUTING: bool = true;
    type Filter = ListClustersRequest;

    fn id(&self) -> i64 {
        self.id
    }

    fn set_id(&mut self, id: i64) {
        self.id = id;
    }

    fn columns(&self) -> Vec<(&'static str, Value)> {
        vec![
            ("name", (&self.name).into()),
            ("labels", Value::Text(join_list(&self.labels))),
            ("partial_reload", self.partial_reload.into()),
            ("service_mesh_routing", self.service_mesh_routing.into()),
        ]
    }

    fn from_row(row: &AnyRow) -> Result<Cluster> {
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

    fn conditions(filter: &ListClustersRequest) -> Vec<Condition> {
        name_prefix(&filter.name_prefix)
    }

    async fn check(&self, tx: &mut Tx<'_>) -> Result<()> {
        ensure_unique(tx, self, "name", &self.name, "cluster.name").await
    }

    /// An updated cluster reloads itself; a new one has no servers yet, a deleted one none left.
    async fn affected(
        _: &mut Tx<'_>,
        before: Option<&Cluster>,
        after: Option<&Cluster>,
    ) -> Result<BTreeSet<i64>> {
        Ok(match (before, after) {
            (Some(_), Some(after)) => BTreeSet::from([after.id]),
            _ => BTreeSet::new(),
        })
    }

    /// Refuses while servers belong to the cluster; directors stop being served by it and its
    /// finished tasks go with it.
    async fn before_delete(&self, tx: &mut Tx<'_>) -> Result<()> {
        ensure_unused::<Cluster, VarnishServer>(tx, self, "cluster_id").await?;
        for table in ["director_clusters", "tasks"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE cluster_id = $1"))
                .bind(self.id)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }
}
