//! VCL templates: the VCL a server runs, with tags that expand to the generated parts.

use std::collections::BTreeSet;

use sqlx::Row;
use sqlx::any::AnyRow;
use vaas_proto::v1::{ListVclTemplatesRequest, VarnishServer, VclTemplate, VclTemplateRevision};

use crate::resource::{
    Change, Condition, Resource, Tx, Value, ensure_unique, ensure_unused, ids, name_prefix, updated,
};
use crate::resource::{Page, cut_page, page_limit, parse_page_token};
use crate::rows::timestamp;
use crate::{Error, Result, Store};

impl Resource for VclTemplate {
    const TABLE: &'static str = "vcl_templates";
    const COLLECTION: &'static str = "vcl_templates";
    const MESSAGE: &'static str = "vaas.v1.VclTemplate";
    const KIND: &'static str = "vcl template";
    const FIELD: &'static str = "vcl_template";
    type Filter = ListVclTemplatesRequest;

    fn id(&self) -> i64 {
        self.id
    }

    fn set_id(&mut self, id: i64) {
        self.id = id;
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

    fn conditions(filter: &ListVclTemplatesRequest) -> Vec<Condition> {
        name_prefix(&filter.name_prefix)
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
        let Some(after) = updated(before, after) else {
            return Ok(BTreeSet::new());
        };
        ids(
            tx,
            "SELECT cluster_id FROM varnish_servers WHERE template_id = $1",
            after.id,
        )
        .await
    }

    /// Keeps the saved content and comment as the template's next revision.
    async fn save_links(&self, tx: &mut Tx<'_>, id: i64, change: Change<'_>) -> Result<()> {
        sqlx::query(
            "INSERT INTO vcl_template_revisions (template_id, revision, content, comment, time, \
             actor) SELECT $1, COALESCE(MAX(revision), 0) + 1, $2, $3, $4, $5 \
             FROM vcl_template_revisions WHERE template_id = $1",
        )
        .bind(id)
        .bind(&self.content)
        .bind(&self.comment)
        .bind(change.timestamp)
        .bind(change.actor)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn before_delete(&self, tx: &mut Tx<'_>) -> Result<()> {
        ensure_unused::<VclTemplate, VarnishServer>(tx, self, "template_id").await
    }
}

impl Store {
    /// Lists the revisions of a template, newest first.
    pub async fn list_template_revisions(
        &self,
        template_id: i64,
        page_size: i32,
        page_token: &str,
    ) -> Result<Page<VclTemplateRevision>> {
        self.get::<VclTemplate>(template_id).await?;
        let limit = page_limit(page_size);
        let before = match parse_page_token(page_token)? {
            0 => i64::MAX,
            revision => revision,
        };
        let rows = sqlx::query(
            "SELECT * FROM vcl_template_revisions WHERE template_id = $1 AND revision < $2 \
             ORDER BY revision DESC LIMIT $3",
        )
        .bind(template_id)
        .bind(before)
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await?;
        let (rows, next) = cut_page(rows, limit, |row| row.try_get::<i64, _>("revision"));
        Ok((rows.iter().map(revision).collect::<Result<_>>()?, next))
    }

    /// Returns one revision of a template.
    pub async fn get_template_revision(
        &self,
        template_id: i64,
        number: i64,
    ) -> Result<VclTemplateRevision> {
        let row = sqlx::query(
            "SELECT * FROM vcl_template_revisions WHERE template_id = $1 AND revision = $2",
        )
        .bind(template_id)
        .bind(number)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(Error::RevisionNotFound {
            template_id,
            revision: number,
        })?;
        revision(&row)
    }
}

fn revision(row: &AnyRow) -> Result<VclTemplateRevision> {
    Ok(VclTemplateRevision {
        template_id: row.try_get("template_id")?,
        revision: row.try_get("revision")?,
        content: row.try_get("content")?,
        comment: row.try_get("comment")?,
        time: Some(timestamp(row.try_get("time")?)),
        actor: row.try_get("actor")?,
    })
}
