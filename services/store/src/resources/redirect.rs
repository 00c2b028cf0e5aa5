//! Redirects: requests for a mapped domain whose URL matches a condition are answered with a
//! redirect, in the clusters of the domain mapping.

use std::collections::BTreeSet;

use sqlx::Row;
use sqlx::any::AnyRow;
use vaas_proto::v1::{DomainMapping, ListRedirectsRequest, Redirect, RedirectHeader};

use crate::resource::{Condition, Resource, Tx, Value, ensure_reference, ids};
use crate::rows::{decode_messages, encode_messages, flag};
use crate::{Error, Result};

impl Resource for Redirect {
    const TABLE: &'static str = "redirects";
    const COLLECTION: &'static str = "redirects";
    const MESSAGE: &'static str = "vaas.v1.Redirect";
    const KIND: &'static str = "redirect";
    const FIELD: &'static str = "redirect";
    const CHANGES_ROUTING: bool = true;
    type Filter = ListRedirectsRequest;

    fn id(&self) -> i64 {
        self.id
    }

    fn set_id(&mut self, id: i64) {
        self.id = id;
    }

    fn columns(&self) -> Vec<(&'static str, Value)> {
        let header = self.required_header.clone().unwrap_or_default();
        vec![
            ("source_domain_id", self.source_domain_id.into()),
            ("condition", (&self.condition).into()),
            ("rewrite_groups", self.rewrite_groups.into()),
            ("destination", (&self.destination).into()),
            ("status", self.status.into()),
            ("priority", self.priority.into()),
            ("preserve_query", self.preserve_query.into()),
            ("required_header_name", Value::Text(header.name)),
            ("required_header_value", Value::Text(header.value)),
            ("assertions", Value::Text(encode_messages(&self.assertions))),
            ("description", (&self.description).into()),
        ]
    }

    fn from_row(row: &AnyRow) -> Result<Redirect> {
        let name: String = row.try_get("required_header_name")?;
        let required_header = (!name.is_empty())
            .then(|| -> Result<RedirectHeader> {
                Ok(RedirectHeader {
                    name,
                    value: row.try_get("required_header_value")?,
                })
            })
            .transpose()?;
        Ok(Redirect {
            id: row.try_get("id")?,
            source_domain_id: row.try_get("source_domain_id")?,
            condition: row.try_get("condition")?,
            rewrite_groups: flag(row, "rewrite_groups")?,
            destination: row.try_get("destination")?,
            status: row.try_get::<i64, _>("status")? as u32,
            priority: row.try_get::<i64, _>("priority")? as u32,
            preserve_query: flag(row, "preserve_query")?,
            required_header,
            assertions: decode_messages(
                &row.try_get::<String, _>("assertions")?,
                "redirect assertion",
            )?,
            description: row.try_get("description")?,
        })
    }

    fn conditions(filter: &ListRedirectsRequest) -> Vec<Condition> {
        let mut conditions = Vec::new();
        if filter.source_domain_id != 0 {
            conditions.push(Condition::new(
                "source_domain_id = ?",
                filter.source_domain_id,
            ));
        }
        conditions
    }

    /// The source domain must exist, and no other redirect of it may have the same priority.
    async fn check(&self, tx: &mut Tx<'_>) -> Result<()> {
        ensure_reference::<DomainMapping>(tx, "redirect.source_domain_id", self.source_domain_id)
            .await?;
        let taken: Option<i64> = sqlx::query_scalar(
            "SELECT id FROM redirects WHERE source_domain_id = $1 AND priority = $2 AND id <> $3",
        )
        .bind(self.source_domain_id)
        .bind(i64::from(self.priority))
        .bind(self.id)
        .fetch_optional(&mut **tx)
        .await?;
        match taken {
            Some(other) => Err(Error::AlreadyExists {
                field: "redirect.priority",
                value: format!(
                    "{} (redirect {other} of domain mapping {} has it)",
                    self.priority, self.source_domain_id
                ),
            }),
            None => Ok(()),
        }
    }

    /// The clusters of the source domain it had and has now.
    async fn affected(
        tx: &mut Tx<'_>,
        before: Option<&Redirect>,
        after: Option<&Redirect>,
    ) -> Result<BTreeSet<i64>> {
        let mut clusters = BTreeSet::new();
        for redirect in before.into_iter().chain(after) {
            clusters.extend(
                ids(
                    tx,
                    "SELECT cluster_id FROM domain_mapping_clusters WHERE domain_mapping_id = $1",
                    redirect.source_domain_id,
                )
                .await?,
            );
        }
        Ok(clusters)
    }
}
