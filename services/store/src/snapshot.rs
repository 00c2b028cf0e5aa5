//! Consistent snapshots of one cluster's configuration, for rendering its VCL.

use std::collections::BTreeSet;

use sqlx::Executor;
use vaas_proto::v1::{ClusterSnapshot, ServerStatus};

use crate::config::director_cluster_ids;
use crate::rows::{self, BACKEND_COLUMNS, CLUSTER_COLUMNS, DC_COLUMNS, DIRECTOR_COLUMNS};
use crate::rows::{SERVER_COLUMNS, TEMPLATE_COLUMNS};
use crate::{Dialect, Error, Result, Store, clock};

impl Store {
    /// Reads everything needed to render the VCL of every non-disabled server of a cluster, in
    /// one consistent snapshot whose `version` is the newest store timestamp it includes.
    pub async fn cluster_snapshot(&self, cluster_id: i64) -> Result<ClusterSnapshot> {
        let mut transaction = self.pool.begin().await?;
        if self.dialect == Dialect::Postgres {
            transaction
                .execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                .await?;
        }
        let version = clock::current(&mut transaction).await?;
        let cluster = sqlx::query(&format!(
            "SELECT {CLUSTER_COLUMNS} FROM clusters WHERE id = $1"
        ))
        .bind(cluster_id)
        .fetch_optional(&mut *transaction)
        .await?
        .ok_or(Error::NotFound {
            resource: "cluster",
            id: cluster_id,
        })?;
        let cluster = rows::cluster(&cluster)?;
        let servers = sqlx::query(&format!(
            "SELECT {SERVER_COLUMNS} FROM varnish_servers WHERE cluster_id = $1 AND status <> $2 \
             ORDER BY id"
        ))
        .bind(cluster_id)
        .bind(ServerStatus::Disabled as i32 as i64)
        .fetch_all(&mut *transaction)
        .await?
        .iter()
        .map(rows::server)
        .collect::<Result<Vec<_>>>()?;
        let templates = sqlx::query(&format!(
            "SELECT {TEMPLATE_COLUMNS} FROM vcl_templates WHERE id IN \
             (SELECT template_id FROM varnish_servers WHERE cluster_id = $1 AND status <> $2) \
             ORDER BY id"
        ))
        .bind(cluster_id)
        .bind(ServerStatus::Disabled as i32 as i64)
        .fetch_all(&mut *transaction)
        .await?
        .iter()
        .map(rows::template)
        .collect::<Result<Vec<_>>>()?;
        let director_rows = sqlx::query(&format!(
            "SELECT {DIRECTOR_COLUMNS} FROM directors WHERE enabled = 1 AND id IN \
             (SELECT director_id FROM director_clusters WHERE cluster_id = $1) ORDER BY id"
        ))
        .bind(cluster_id)
        .fetch_all(&mut *transaction)
        .await?;
        let mut directors = Vec::with_capacity(director_rows.len());
        for row in &director_rows {
            let mut director = rows::director(row)?;
            director.cluster_ids = director_cluster_ids(&mut transaction, director.id).await?;
            directors.push(director);
        }
        let backends = sqlx::query(&format!(
            "SELECT {BACKEND_COLUMNS} FROM backends WHERE enabled = 1 AND director_id IN \
             (SELECT d.id FROM directors d JOIN director_clusters dc ON dc.director_id = d.id \
              WHERE dc.cluster_id = $1 AND d.enabled = 1) ORDER BY id"
        ))
        .bind(cluster_id)
        .fetch_all(&mut *transaction)
        .await?
        .iter()
        .map(rows::backend)
        .collect::<Result<Vec<_>>>()?;
        let dc_ids: BTreeSet<i64> = servers
            .iter()
            .map(|server| server.dc_id)
            .chain(backends.iter().map(|backend| backend.dc_id))
            .collect();
        let dc_list = dc_ids
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let dcs = if dc_ids.is_empty() {
            Vec::new()
        } else {
            sqlx::query(&format!(
                "SELECT {DC_COLUMNS} FROM dcs WHERE id IN ({dc_list}) ORDER BY id"
            ))
            .fetch_all(&mut *transaction)
            .await?
            .iter()
            .map(rows::dc)
            .collect::<Result<Vec<_>>>()?
        };
        transaction.commit().await?;
        Ok(ClusterSnapshot {
            version,
            cluster: Some(cluster),
            servers,
            dcs,
            templates,
            directors,
            backends,
        })
    }
}
