//! Varnish servers: one varnishd each, in a cluster and a datacenter, running a template.
//! The agent's reports (running VCL version, last seen) are kept here but never written by a
//! configuration change.

use std::collections::{BTreeSet, HashMap};

use sqlx::Row;
use sqlx::any::AnyRow;
use vaas_proto::v1::{
    Cluster, Dc, ListVarnishServersRequest, ServerStatus, SyncState, VarnishServer, VclTemplate,
};

use crate::resource::{Condition, Resource, Tx, Value, ensure_reference};
use crate::rows::{flag, port, split_list, timestamp};
use crate::{Error, Result};

/// The sync state a row tells by itself: DISCONNECTED, ERROR, or SYNCED until compared with
/// the cluster's newest change.
fn provisional_sync_state(row: &AnyRow) -> Result<SyncState> {
    let status: i64 = row.try_get("status")?;
    if status == i64::from(ServerStatus::Disabled as i32) || status == 0 {
        return Ok(SyncState::Unspecified);
    }
    if !flag(row, "agent_attached")? {
        return Ok(SyncState::Disconnected);
    }
    if !row.try_get::<String, _>("sync_error")?.is_empty() {
        return Ok(SyncState::Error);
    }
    Ok(SyncState::Synced)
}

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
            cc_command: row.try_get("cc_command")?,
            sync_state: provisional_sync_state(row)? as i32,
            synced_timestamp: match row.try_get::<i64, _>("synced_version")? {
                0 => None,
                micros => Some(timestamp(micros)),
            },
            sync_error: row.try_get("sync_error")?,
        })
    }

    /// Servers that seem in sync are OUTDATED when their cluster has a newer change.
    async fn load_links(tx: &mut Tx<'_>, servers: &mut [VarnishServer]) -> Result<()> {
        let clusters: BTreeSet<i64> = servers.iter().map(|server| server.cluster_id).collect();
        if clusters.is_empty() {
            return Ok(());
        }
        let list = clusters
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let newest: HashMap<i64, i64> = sqlx::query_as::<_, (i64, i64)>(&format!(
            "SELECT cluster_id, MAX(timestamp) FROM tasks WHERE cluster_id IN ({list}) \
             GROUP BY cluster_id"
        ))
        .fetch_all(&mut **tx)
        .await?
        .into_iter()
        .collect();
        for server in servers {
            let newest = newest.get(&server.cluster_id).copied().unwrap_or_default();
            let synced = server
                .synced_timestamp
                .as_ref()
                .map_or(0, crate::rows::timestamp_micros);
            if server.sync_state == SyncState::Synced as i32 && synced < newest {
                server.sync_state = SyncState::Outdated as i32;
            }
        }
        Ok(())
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
