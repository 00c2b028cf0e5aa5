//! VCL variables: values written into one cluster's VCL wherever a template says `#{key}`.

use std::collections::BTreeSet;

use sqlx::Row;
use sqlx::any::AnyRow;
use vaas_proto::v1::{Cluster, ListVclVariablesRequest, VclVariable};

use crate::Result;
use crate::resource::{Condition, Resource, Tx, Value, ensure_reference, ensure_unique_within};

impl Resource for VclVariable {
    const TABLE: &'static str = "vcl_variables";
    const COLLECTION: &'static str = "vcl_variables";
    const MESSAGE: &'static str = "vaas.v1.VclVariable";
    const KIND: &'static str = "vcl variable";
    const FIELD: &'static str = "vcl_variable";
    type Filter = ListVclVariablesRequest;

    fn id(&self) -> i64 {
        self.id
    }

    fn set_id(&mut self, id: i64) {
        self.id = id;
    }

    fn columns(&self) -> Vec<(&'static str, Value)> {
        vec![
            ("cluster_id", self.cluster_id.into()),
            ("key", (&self.key).into()),
            ("value", (&self.value).into()),
        ]
    }

    fn from_row(row: &AnyRow) -> Result<VclVariable> {
        Ok(VclVariable {
            id: row.try_get("id")?,
            cluster_id: row.try_get("cluster_id")?,
            key: row.try_get("key")?,
            value: row.try_get("value")?,
        })
    }

    fn conditions(filter: &ListVclVariablesRequest) -> Vec<Condition> {
        let mut conditions = Vec::new();
        if filter.cluster_id != 0 {
            conditions.push(Condition::new("cluster_id = ?", filter.cluster_id));
        }
        conditions
    }

    async fn check(&self, tx: &mut Tx<'_>) -> Result<()> {
        ensure_reference::<Cluster>(tx, "vcl_variable.cluster_id", self.cluster_id).await?;
        ensure_unique_within(
            tx,
            self,
            ("cluster_id", self.cluster_id),
            ("key", &self.key),
            "vcl_variable.key",
        )
        .await
    }

    /// The cluster the variable belonged to and the one it belongs to now.
    async fn affected(
        _: &mut Tx<'_>,
        before: Option<&VclVariable>,
        after: Option<&VclVariable>,
    ) -> Result<BTreeSet<i64>> {
        Ok(before
            .into_iter()
            .chain(after)
            .map(|variable| variable.cluster_id)
            .collect())
    }
}
