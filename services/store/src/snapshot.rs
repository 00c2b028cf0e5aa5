//! Consistent snapshots of one cluster's configuration, for rendering its VCL.

use std::collections::BTreeSet;

use sqlx::Executor;
use vaas_proto::v1::{
    Backend, Cluster, ClusterSnapshot, Dc, Director, DomainMapping, Probe, Redirect, Route,
    ServerStatus, TimeProfile, VarnishServer, VclTemplate, VclTemplateBlock, VclVariable,
};

use crate::resource::{Resource, Tx, select};
use crate::{Dialect, Error, Result, Store, clock};

/// The status number of disabled servers, which get no VCL.
const DISABLED: i32 = ServerStatus::Disabled as i32;

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
        let snapshot = read(&mut transaction, cluster_id, version).await?;
        transaction.commit().await?;
        Ok(snapshot)
    }
}

/// Reads the snapshot of `cluster_id` inside `tx` (a write sees its own changes), stamped
/// `version`.
pub(crate) async fn read(
    tx: &mut Tx<'_>,
    cluster_id: i64,
    version: i64,
) -> Result<ClusterSnapshot> {
    let cluster = select::<Cluster>(tx, "id = $1", cluster_id)
        .await?
        .pop()
        .ok_or(Error::NotFound {
            resource: Cluster::KIND,
            id: cluster_id,
        })?;
    let servers = select::<VarnishServer>(
        tx,
        &format!("cluster_id = $1 AND status <> {DISABLED}"),
        cluster_id,
    )
    .await?;
    let templates = select::<VclTemplate>(
        tx,
        &format!(
            "id IN (SELECT template_id FROM varnish_servers \
                 WHERE cluster_id = $1 AND status <> {DISABLED})"
        ),
        cluster_id,
    )
    .await?;
    let directors = select::<Director>(
        tx,
        "enabled = 1 AND id IN (SELECT director_id FROM director_clusters WHERE cluster_id = $1)",
        cluster_id,
    )
    .await?;
    let backends = select::<Backend>(
        tx,
        "enabled = 1 AND director_id IN (SELECT d.id FROM directors d \
             JOIN director_clusters dc ON dc.director_id = d.id \
             WHERE dc.cluster_id = $1 AND d.enabled = 1)",
        cluster_id,
    )
    .await?;
    let dc_ids: BTreeSet<i64> = servers
        .iter()
        .map(|server| server.dc_id)
        .chain(backends.iter().map(|backend| backend.dc_id))
        .collect();
    let mut dcs = select::<Dc>(tx, "id > $1", 0).await?;
    dcs.retain(|dc| dc_ids.contains(&dc.id));
    let of_directors = |column: &str| {
        format!(
            "id IN (SELECT {column} FROM directors WHERE enabled = 1 AND id IN \
                 (SELECT director_id FROM director_clusters WHERE cluster_id = $1))"
        )
    };
    let probes = select::<Probe>(tx, &of_directors("probe_id"), cluster_id).await?;
    let time_profiles =
        select::<TimeProfile>(tx, &of_directors("time_profile_id"), cluster_id).await?;
    let template_blocks = select::<VclTemplateBlock>(
        tx,
        &format!(
            "template_id IN (SELECT template_id FROM varnish_servers \
                 WHERE cluster_id = $1 AND status <> {DISABLED})"
        ),
        cluster_id,
    )
    .await?;
    let variables = select::<VclVariable>(tx, "cluster_id = $1", cluster_id).await?;
    let routes = select::<Route>(
        tx,
        &format!(
            "director_id IN (SELECT d.id FROM directors d JOIN director_clusters dcl \
                 ON dcl.director_id = d.id WHERE d.enabled = 1 AND dcl.cluster_id = $1) AND {}",
            crate::resources::ROUTES_OF_CLUSTER.replace('?', "$1")
        ),
        cluster_id,
    )
    .await?;
    let domain_mappings = select::<DomainMapping>(
        tx,
        "id IN (SELECT domain_mapping_id FROM domain_mapping_clusters WHERE cluster_id = $1)",
        cluster_id,
    )
    .await?;
    let redirects = select::<Redirect>(
        tx,
        "source_domain_id IN (SELECT domain_mapping_id FROM domain_mapping_clusters \
         WHERE cluster_id = $1)",
        cluster_id,
    )
    .await?;
    Ok(ClusterSnapshot {
        version,
        cluster: Some(cluster),
        servers,
        dcs,
        templates,
        directors,
        backends,
        probes,
        time_profiles,
        template_blocks,
        variables,
        routes,
        domain_mappings,
        redirects,
    })
}
