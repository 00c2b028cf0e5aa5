//! Varnish servers: one varnishd each, in a cluster and a datacenter, running a template.
//! The agent's reports (running VCL version, last seen) are kept here but never written by a
//! configuration change.

use std::collections::BTreeSet;

use sqlx::Row;
use sqlx::any::AnyRow;
use vaas_proto::v1::{Cluster, Dc, ListVarnishServersRequest, VarnishServer, VclTemplate};

use crate::resource::{Condition, Resource, Tx, Value, ensure_reference};
use crate::rows::{flag, port, split_list, timestamp};
use crate::{Error, Result};

impl Resource for VarnishServer {
    const TABLE: &'static str = "varnish_servers";
    const COLLECTION: &'static str = "varnish_servers";
    const MESSAGE: &'static str = "vaas.v1.VarnishServer";
    const KIND: &'static str = "varnish server";
    const FIELD: &'static str = "varnish_server";
    type Filter = ListVarnishServersRequest;

    fn id(&self) -> i64 {
        self.id
    }

    fn set_id(&mut self, id: i64) {
        self.id = id;
    }

    fn columns(&self) -> Vec<(&'static str, Value)> {
        vec![
            ("address", (&self.address).into()),
            ("hostname", (&self.hostname).into()),
            ("http_port", self.http_port.unwrap_or_default().into()),
            ("admin_port", self.admin_port.unwrap_or_default().into()),
            ("status", self.status.into()),
            ("dc_id", self.dc_id.into()),
            ("template_id", self.template_id.into()),
            ("cluster_id", self.cluster_id.into()),
            ("is_canary", self.is_canary.into()),
        ]
    }

    fn from_row(row: &AnyRow) -> Result<VarnishServer> {
        Ok(VarnishServer {
            id: row.try_get("id")?,
            address: row.try_get("address")?,
            hostname: row.try_get("hostname")?,
            http_port: Some(port(row, "http_port")?),
            admin_port: Some(port(row, "admin_port")?),
            status: row.try_get::<i64, _>("status")? as i32,
            dc_id: row.try_get("dc_id")?,
            template_id: row.try_get("template_id")?,
            cluster_id: row.try_get("cluster_id")?,
            is_canary: flag(row, "is_canary")?,
            running_vcl_version: row.try_get("running_vcl_version")?,
            agent_seen_time: row
                .try_get::<Option<i64>, _>("agent_seen_time")?
                .map(timestamp),
            unsafe_settings: split_list(row.try_get("unsafe_settings")?),
        })
    }

    fn conditions(filter: &ListVarnishServersRequest) -> Vec<Condition> {
        let mut conditions = Vec::new();
        if filter.cluster_id != 0 {
            conditions.push(Condition::new("cluster_id = ?", filter.cluster_id));
        }
        if filter.dc_id != 0 {
            conditions.push(Condition::new("dc_id = ?", filter.dc_id));
        }
        if filter.status != 0 {
            conditions.push(Condition::new("status = ?", filter.status));
        }
        if filter.template_id != 0 {
            conditions.push(Condition::new("template_id = ?", filter.template_id));
        }
        conditions
    }

    async fn check(&self, tx: &mut Tx<'_>) -> Result<()> {
        ensure_reference::<Dc>(tx, "varnish_server.dc_id", self.dc_id).await?;
        ensure_reference::<VclTemplate>(tx, "varnish_server.template_id", self.template_id).await?;
        ensure_reference::<Cluster>(tx, "varnish_server.cluster_id", self.cluster_id).await?;
        let admin_port = i64::from(self.admin_port.unwrap_or_default());
        let taken: Option<i64> = sqlx::query_scalar(
            "SELECT id FROM varnish_servers WHERE address = $1 AND admin_port = $2 AND id <> $3",
        )
        .bind(&self.address)
        .bind(admin_port)
        .bind(self.id)
        .fetch_optional(&mut **tx)
        .await?;
        if taken.is_some() {
            return Err(Error::AlreadyExists {
                field: "varnish_server.admin_port",
                value: format!("{} port {admin_port}", self.address),
            });
        }
        Ok(())
    }

    /// A new or changed server reloads its old and new cluster, so that it gets its VCL; a
    /// deleted one changes no other server's VCL.
    async fn affected(
        _: &mut Tx<'_>,
        before: Option<&VarnishServer>,
        after: Option<&VarnishServer>,
    ) -> Result<BTreeSet<i64>> {
        let Some(after) = after else {
            return Ok(BTreeSet::new());
        };
        Ok(before
            .iter()
            .chain([&after])
            .map(|server| server.cluster_id)
            .collect())
    }
}
