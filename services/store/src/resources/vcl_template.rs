//! VCL templates: the VCL a server runs, with tags that expand to the generated parts.

use std::collections::BTreeSet;

use sqlx::Row;
use sqlx::any::AnyRow;
use vaas_proto::v1::{ListVclTemplatesRequest, VarnishServer, VclTemplate};

use crate::Result;
use crate::resource::{Condition, Resource, Tx, Value, ensure_unique, ensure_unused, ids};

impl Resource for VclTemplate {
    const TABLE: &'static str = "vcl_templates";
    const KIND: &'static str = "vcl template";
    const FIELD: &'static str = "vcl_template";
    type Filter = ListVclTemplatesRequest;

    fn id(&self) -> i64 {
        self.id
    }

    fn columns(&self) -> Vec<(&'static str, Value)> {
        vec![
            ("name", (&self.name).into()),
            ("content", (&self.content).into()),
            ("syntax", self.syntax.into()),
            ("comment", (&self.comment).into()),
        ]
    }

    fn from_row(row: &AnyRow) -> Result<VclTemplate> {
        Ok(VclTemplate {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            content: row.try_get("content")?,
            syntax: row.try_get::<i64, _>("syntax")? as i32,
            comment: row.try_get("comment")?,
        })
    }

    fn conditions(_: &ListVclTemplatesRequest) -> Vec<Condition> {
        Vec::new()
    }

    async fn check(&self, tx: &mut Tx<'_>) -> Result<()> {
        ensure_unique(tx, self, "name", &self.name, "vcl_template.name").await
    }

    /// A changed template reloads the clusters whose servers use it.
    async fn affected(
        tx: &mut Tx<'_>,
        before: Option<&VclTemplate>,
        after: Option<&VclTemplate>,
    ) -> Result<BTreeSet<i64>> {
        let (Some(_), Some(after)) = (before, after) else {
            return Ok(BTreeSet::new());
        };
        ids(
            tx,
            "SELECT cluster_id FROM varnish_servers WHERE template_id = $1",
            after.id,
        )
        .await
    }

    async fn before_delete(&self, tx: &mut Tx<'_>) -> Result<()> {
        ensure_unused::<VclTemplate, VarnishServer>(tx, self, "template_id").await
    }
}
