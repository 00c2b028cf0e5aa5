//! VCL template blocks: VCL that replaces the built-in body of one tag in one template.

use std::collections::BTreeSet;

use sqlx::Row;
use sqlx::any::AnyRow;
use vaas_proto::v1::{ListVclTemplateBlocksRequest, VclTemplate, VclTemplateBlock};

use crate::Result;
use crate::resource::{
    Condition, Resource, Tx, Value, ensure_reference, ensure_unique_within, ids_for_each,
};

impl Resource for VclTemplateBlock {
    const TABLE: &'static str = "vcl_template_blocks";
    const COLLECTION: &'static str = "vcl_template_blocks";
    const MESSAGE: &'static str = "vaas.v1.VclTemplateBlock";
    const KIND: &'static str = "vcl template block";
    const FIELD: &'static str = "vcl_template_block";
    type Filter = ListVclTemplateBlocksRequest;

    fn id(&self) -> i64 {
        self.id
    }

    fn set_id(&mut self, id: i64) {
        self.id = id;
    }

    fn columns(&self) -> Vec<(&'static str, Value)> {
        vec![
            ("template_id", self.template_id.into()),
            ("tag", (&self.tag).into()),
            ("content", (&self.content).into()),
        ]
    }

    fn from_row(row: &AnyRow) -> Result<VclTemplateBlock> {
        Ok(VclTemplateBlock {
            id: row.try_get("id")?,
            template_id: row.try_get("template_id")?,
            tag: row.try_get("tag")?,
            content: row.try_get("content")?,
        })
    }

    fn conditions(filter: &ListVclTemplateBlocksRequest) -> Vec<Condition> {
        let mut conditions = Vec::new();
        if filter.template_id != 0 {
            conditions.push(Condition::new("template_id = ?", filter.template_id));
        }
        conditions
    }

    async fn check(&self, tx: &mut Tx<'_>) -> Result<()> {
        ensure_reference::<VclTemplate>(tx, "vcl_template_block.template_id", self.template_id)
            .await?;
        ensure_unique_within(
            tx,
            self,
            ("template_id", self.template_id),
            ("tag", &self.tag),
            "vcl_template_block.tag",
        )
        .await
    }

    /// The clusters whose servers use the template the block belonged to or belongs to now.
    async fn affected(
        tx: &mut Tx<'_>,
        before: Option<&VclTemplateBlock>,
        after: Option<&VclTemplateBlock>,
    ) -> Result<BTreeSet<i64>> {
        let templates = before
            .into_iter()
            .chain(after)
            .map(|block| block.template_id);
        ids_for_each(
            tx,
            "SELECT cluster_id FROM varnish_servers WHERE template_id = $1",
            templates,
        )
        .await
    }
}
