//! Domain mappings: a domain as redirects name it, the hosts it stands for (static names,
//! expressions, or templates filled from cluster labels), and the clusters that redirect it (the
//! `domain_mapping_clusters` link table).

use std::collections::BTreeSet;

use sqlx::Row;
use sqlx::any::AnyRow;
use vaas_proto::v1::{Cluster, DomainMapping, ListDomainMappingsRequest, Redirect};

use crate::Result;
use crate::resource::{
    Change, ClusterLinks, Condition, Resource, Tx, Value, ensure_reference, ensure_unique,
    ensure_unused,
};
use crate::rows::{join_list, split_list};

/// The clusters whose VCL redirects a domain mapping.
const CLUSTERS: ClusterLinks = ClusterLinks {
    table: "domain_mapping_clusters",
    owner_column: "domain_mapping_id",
};

impl Resource for DomainMapping {
    const TABLE: &'static str = "domain_mappings";
    const COLLECTION: &'static str = "domain_mappings";
    const MESSAGE: &'static str = "vaas.v1.DomainMapping";
    const KIND: &'static str = "domain mapping";
    const FIELD: &'static str = "domain_mapping";
    const CHANGES_ROUTING: bool = true;
    type Filter = ListDomainMappingsRequest;

    fn id(&self) -> i64 {
        self.id
    }

    fn set_id(&mut self, id: i64) {
        self.id = id;
    }

    fn columns(&self) -> Vec<(&'static str, Value)> {
        vec![
            ("domain", (&self.domain).into()),
            ("mappings", Value::Text(join_list(&self.mappings))),
            ("mapping_type", self.r#type.into()),
            ("description", (&self.description).into()),
        ]
    }

    /// Converts a row; `cluster_ids` come from the link table in [`Resource::load_links`].
    fn from_row(row: &AnyRow) -> Result<DomainMapping> {
        Ok(DomainMapping {
            id: row.try_get("id")?,
            domain: row.try_get("domain")?,
            mappings: split_list(row.try_get("mappings")?),
            r#type: row.try_get::<i64, _>("mapping_type")? as i32,
            cluster_ids: Vec::new(),
            description: row.try_get("description")?,
        })
    }

    fn conditions(filter: &ListDomainMappingsRequest) -> Vec<Condition> {
        let mut conditions = Vec::new();
        if filter.cluster_id != 0 {
            conditions.push(Condition::new(
                "id IN (SELECT domain_mapping_id FROM domain_mapping_clusters WHERE cluster_id = ?)",
                filter.cluster_id,
            ));
        }
        conditions
    }

    async fn check(&self, tx: &mut Tx<'_>) -> Result<()> {
        ensure_unique(tx, self, "domain", &self.domain, "domain_mapping.domain").await?;
        for &cluster_id in &self.cluster_ids {
            ensure_reference::<Cluster>(tx, "domain_mapping.cluster_ids", cluster_id).await?;
        }
        Ok(())
    }

    /// The clusters the mapping was in and is in now.
    async fn affected(
        _: &mut Tx<'_>,
        before: Option<&DomainMapping>,
        after: Option<&DomainMapping>,
    ) -> Result<BTreeSet<i64>> {
        Ok(before
            .into_iter()
            .chain(after)
            .flat_map(|mapping| mapping.cluster_ids.iter().copied())
            .collect())
    }

    async fn save_links(&self, tx: &mut Tx<'_>, id: i64, _: Change<'_>) -> Result<()> {
        CLUSTERS.save(tx, id, &self.cluster_ids).await
    }

    async fn load_links(tx: &mut Tx<'_>, mappings: &mut [DomainMapping]) -> Result<()> {
        CLUSTERS
            .fill(tx, mappings, |item| item.id, |item| &mut item.cluster_ids)
            .await
    }

    async fn before_delete(&self, tx: &mut Tx<'_>) -> Result<()> {
        ensure_unused::<DomainMapping, Redirect>(tx, self, "source_domain_id").await
    }
}
