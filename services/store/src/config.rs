//! Create, read, update and delete of configuration resources.
//!
//! Each write opens a transaction, takes the next store timestamp (which serialises writers),
//! checks references and uniqueness so that errors name the request field, applies the change,
//! and creates a reload task plus an outbox row for every cluster whose VCL may change. Callers
//! pass messages already validated and normalised by the API (optional fields set).

use std::collections::BTreeSet;

use sqlx::any::AnyRow;
use sqlx::{Any, Transaction};
use vaas_proto::v1::{
    Backend, Cluster, Dc, Director, ServerStatus, Task, VarnishServer, VclTemplate,
};

use crate::rows::{self, BACKEND_COLUMNS, CLUSTER_COLUMNS, DC_COLUMNS, DIRECTOR_COLUMNS};
use crate::rows::{SERVER_COLUMNS, Stored, TEMPLATE_COLUMNS, duration_micros, join_list};
use crate::{Error, Result, Store, clock, tasks};

/// The result of a write: the resource as stored and the reload tasks the write created.
#[derive(Clone, Debug, PartialEq)]
pub struct WriteOutcome<T> {
    /// The resource as stored (unit for deletes).
    pub value: T,
    /// One reload task per affected cluster, in state PENDING.
    pub tasks: Vec<Task>,
}

/// A page of a listing: the items and the token of the next page (empty on the last page).
pub type Page<T> = (Vec<T>, String);

/// An open write transaction with its store timestamp.
struct Write<'a> {
    transaction: Transaction<'a, Any>,
    timestamp: i64,
}

impl Store {
    async fn begin_write(&self) -> Result<Write<'static>> {
        let mut transaction = self.pool.begin().await?;
        let timestamp = clock::tick(&mut transaction, self.dialect).await?;
        Ok(Write {
            transaction,
            timestamp,
        })
    }

    /// Creates tasks for the affected clusters that have a server to reload, then commits.
    async fn commit_write<T>(
        &self,
        mut write: Write<'_>,
        value: T,
        affected_clusters: BTreeSet<i64>,
        description: String,
    ) -> Result<WriteOutcome<T>> {
        let mut task_ids = Vec::new();
        for cluster_id in affected_clusters {
            let has_servers: Option<i64> = sqlx::query_scalar(
                "SELECT id FROM varnish_servers WHERE cluster_id = $1 AND status <> $2 LIMIT 1",
            )
            .bind(cluster_id)
            .bind(ServerStatus::Disabled as i32 as i64)
            .fetch_optional(&mut *write.transaction)
            .await?;
            if has_servers.is_none() {
                continue;
            }
            let task_id = tasks::create(
                &mut write.transaction,
                self.dialect,
                cluster_id,
                write.timestamp,
                &description,
            )
            .await?;
            task_ids.push(task_id);
        }
        let tasks = tasks::by_ids(&mut write.transaction, &task_ids).await?;
        write.transaction.commit().await?;
        Ok(WriteOutcome { value, tasks })
    }

    // ---- datacenters ----

    /// Creates a datacenter.
    pub async fn create_dc(&self, dc: &Dc) -> Result<WriteOutcome<Dc>> {
        let mut write = self.begin_write().await?;
        ensure_dc_symbol_free(&mut write.transaction, &dc.symbol, None).await?;
        let row = sqlx::query(&format!(
            "INSERT INTO dcs (name, symbol) VALUES ($1, $2) RETURNING {DC_COLUMNS}"
        ))
        .bind(&dc.name)
        .bind(&dc.symbol)
        .fetch_one(&mut *write.transaction)
        .await?;
        let created = rows::dc(&row)?;
        let description = format!("create dc {}", created.id);
        self.commit_write(write, created, BTreeSet::new(), description)
            .await
    }

    /// Returns one datacenter.
    pub async fn get_dc(&self, id: i64) -> Result<Dc> {
        self.fetch_by_id(id).await
    }

    /// Lists datacenters in id order.
    pub async fn list_dcs(&self, page_size: i32, page_token: &str) -> Result<Page<Dc>> {
        self.fetch_page(None, page_size, page_token).await
    }

    /// Replaces a datacenter; reloads the clusters with servers or backends in it.
    pub async fn update_dc(&self, dc: &Dc) -> Result<WriteOutcome<Dc>> {
        let mut write = self.begin_write().await?;
        ensure_exists::<Dc>(&mut write.transaction, dc.id).await?;
        ensure_dc_symbol_free(&mut write.transaction, &dc.symbol, Some(dc.id)).await?;
        let row = sqlx::query(&format!(
            "UPDATE dcs SET name = $1, symbol = $2 WHERE id = $3 RETURNING {DC_COLUMNS}"
        ))
        .bind(&dc.name)
        .bind(&dc.symbol)
        .bind(dc.id)
        .fetch_one(&mut *write.transaction)
        .await?;
        let updated = rows::dc(&row)?;
        let affected = ids(
            &mut write.transaction,
            "SELECT cluster_id FROM varnish_servers WHERE dc_id = $1 \
             UNION SELECT dcl.cluster_id FROM director_clusters dcl \
             JOIN backends b ON b.director_id = dcl.director_id WHERE b.dc_id = $1",
            dc.id,
        )
        .await?;
        let description = format!("update dc {}", dc.id);
        self.commit_write(write, updated, affected, description)
            .await
    }

    /// Deletes a datacenter that no server or backend refers to.
    pub async fn delete_dc(&self, id: i64) -> Result<WriteOutcome<()>> {
        let mut write = self.begin_write().await?;
        ensure_exists::<Dc>(&mut write.transaction, id).await?;
        ensure_unused(&mut write.transaction, "dc", id, "varnish_servers", "dc_id").await?;
        ensure_unused(&mut write.transaction, "dc", id, "backends", "dc_id").await?;
        delete_by_id::<Dc>(&mut write.transaction, id).await?;
        self.commit_write(write, (), BTreeSet::new(), format!("delete dc {id}"))
            .await
    }

    // ---- clusters ----

    /// Creates a cluster.
    pub async fn create_cluster(&self, cluster: &Cluster) -> Result<WriteOutcome<Cluster>> {
        let mut write = self.begin_write().await?;
        ensure_unique::<Cluster>(
            &mut write.transaction,
            "name",
            &cluster.name,
            None,
            "cluster.name",
        )
        .await?;
        let row = sqlx::query(&format!(
            "INSERT INTO clusters (name, labels, partial_reload, service_mesh_routing) \
             VALUES ($1, $2, $3, $4) RETURNING {CLUSTER_COLUMNS}"
        ))
        .bind(&cluster.name)
        .bind(join_list(&cluster.labels))
        .bind(i64::from(cluster.partial_reload))
        .bind(i64::from(cluster.service_mesh_routing))
        .fetch_one(&mut *write.transaction)
        .await?;
        let created = rows::cluster(&row)?;
        let description = format!("create cluster {}", created.id);
        self.commit_write(write, created, BTreeSet::new(), description)
            .await
    }

    /// Returns one cluster with its reload status.
    pub async fn get_cluster(&self, id: i64) -> Result<Cluster> {
        self.fetch_by_id(id).await
    }

    /// Lists clusters in id order.
    pub async fn list_clusters(&self, page_size: i32, page_token: &str) -> Result<Page<Cluster>> {
        self.fetch_page(None, page_size, page_token).await
    }

    /// Replaces the writable fields of a cluster and reloads it.
    pub async fn update_cluster(&self, cluster: &Cluster) -> Result<WriteOutcome<Cluster>> {
        let mut write = self.begin_write().await?;
        ensure_exists::<Cluster>(&mut write.transaction, cluster.id).await?;
        ensure_unique::<Cluster>(
            &mut write.transaction,
            "name",
            &cluster.name,
            Some(cluster.id),
            "cluster.name",
        )
        .await?;
        let row = sqlx::query(&format!(
            "UPDATE clusters SET name = $1, labels = $2, partial_reload = $3, \
             service_mesh_routing = $4 WHERE id = $5 RETURNING {CLUSTER_COLUMNS}"
        ))
        .bind(&cluster.name)
        .bind(join_list(&cluster.labels))
        .bind(i64::from(cluster.partial_reload))
        .bind(i64::from(cluster.service_mesh_routing))
        .bind(cluster.id)
        .fetch_one(&mut *write.transaction)
        .await?;
        let updated = rows::cluster(&row)?;
        let description = format!("update cluster {}", cluster.id);
        self.commit_write(write, updated, BTreeSet::from([cluster.id]), description)
            .await
    }

    /// Deletes a cluster that has no servers; directors stop being served by it.
    pub async fn delete_cluster(&self, id: i64) -> Result<WriteOutcome<()>> {
        let mut write = self.begin_write().await?;
        ensure_exists::<Cluster>(&mut write.transaction, id).await?;
        ensure_unused(
            &mut write.transaction,
            "cluster",
            id,
            "varnish_servers",
            "cluster_id",
        )
        .await?;
        sqlx::query("DELETE FROM director_clusters WHERE cluster_id = $1")
            .bind(id)
            .execute(&mut *write.transaction)
            .await?;
        sqlx::query("DELETE FROM tasks WHERE cluster_id = $1")
            .bind(id)
            .execute(&mut *write.transaction)
            .await?;
        delete_by_id::<Cluster>(&mut write.transaction, id).await?;
        self.commit_write(write, (), BTreeSet::new(), format!("delete cluster {id}"))
            .await
    }

    // ---- VCL templates ----

    /// Creates a VCL template.
    pub async fn create_vcl_template(
        &self,
        template: &VclTemplate,
    ) -> Result<WriteOutcome<VclTemplate>> {
        let mut write = self.begin_write().await?;
        ensure_unique::<VclTemplate>(
            &mut write.transaction,
            "name",
            &template.name,
            None,
            "vcl_template.name",
        )
        .await?;
        let row = sqlx::query(&format!(
            "INSERT INTO vcl_templates (name, content, syntax, comment) VALUES ($1, $2, $3, $4) \
             RETURNING {TEMPLATE_COLUMNS}"
        ))
        .bind(&template.name)
        .bind(&template.content)
        .bind(i64::from(template.syntax))
        .bind(&template.comment)
        .fetch_one(&mut *write.transaction)
        .await?;
        let created = rows::template(&row)?;
        let description = format!("create vcl template {}", created.id);
        self.commit_write(write, created, BTreeSet::new(), description)
            .await
    }

    /// Returns one VCL template.
    pub async fn get_vcl_template(&self, id: i64) -> Result<VclTemplate> {
        self.fetch_by_id(id).await
    }

    /// Lists VCL templates in id order.
    pub async fn list_vcl_templates(
        &self,
        page_size: i32,
        page_token: &str,
    ) -> Result<Page<VclTemplate>> {
        self.fetch_page(None, page_size, page_token).await
    }

    /// Replaces a VCL template; reloads the clusters whose servers use it.
    pub async fn update_vcl_template(
        &self,
        template: &VclTemplate,
    ) -> Result<WriteOutcome<VclTemplate>> {
        let mut write = self.begin_write().await?;
        ensure_exists::<VclTemplate>(&mut write.transaction, template.id).await?;
        ensure_unique::<VclTemplate>(
            &mut write.transaction,
            "name",
            &template.name,
            Some(template.id),
            "vcl_template.name",
        )
        .await?;
        let row = sqlx::query(&format!(
            "UPDATE vcl_templates SET name = $1, content = $2, syntax = $3, comment = $4 \
             WHERE id = $5 RETURNING {TEMPLATE_COLUMNS}"
        ))
        .bind(&template.name)
        .bind(&template.content)
        .bind(i64::from(template.syntax))
        .bind(&template.comment)
        .bind(template.id)
        .fetch_one(&mut *write.transaction)
        .await?;
        let updated = rows::template(&row)?;
        let affected = ids(
            &mut write.transaction,
            "SELECT cluster_id FROM varnish_servers WHERE template_id = $1",
            template.id,
        )
        .await?;
        let description = format!("update vcl template {}", template.id);
        self.commit_write(write, updated, affected, description)
            .await
    }

    /// Deletes a VCL template that no server uses.
    pub async fn delete_vcl_template(&self, id: i64) -> Result<WriteOutcome<()>> {
        let mut write = self.begin_write().await?;
        ensure_exists::<VclTemplate>(&mut write.transaction, id).await?;
        ensure_unused(
            &mut write.transaction,
            "vcl template",
            id,
            "varnish_servers",
            "template_id",
        )
        .await?;
        delete_by_id::<VclTemplate>(&mut write.transaction, id).await?;
        let description = format!("delete vcl template {id}");
        self.commit_write(write, (), BTreeSet::new(), description)
            .await
    }

    // ---- Varnish servers ----

    /// Creates a Varnish server and reloads its cluster so that it gets its VCL.
    pub async fn create_varnish_server(
        &self,
        server: &VarnishServer,
    ) -> Result<WriteOutcome<VarnishServer>> {
        let mut write = self.begin_write().await?;
        check_server_references(&mut write.transaction, server, None).await?;
        let row = sqlx::query(&format!(
            "INSERT INTO varnish_servers (address, hostname, http_port, admin_port, status, dc_id, \
             template_id, cluster_id, is_canary) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             RETURNING {SERVER_COLUMNS}"
        ))
        .bind(&server.address)
        .bind(&server.hostname)
        .bind(i64::from(server.http_port.unwrap_or_default()))
        .bind(i64::from(server.admin_port.unwrap_or_default()))
        .bind(i64::from(server.status))
        .bind(server.dc_id)
        .bind(server.template_id)
        .bind(server.cluster_id)
        .bind(i64::from(server.is_canary))
        .fetch_one(&mut *write.transaction)
        .await?;
        let created = rows::server(&row)?;
        let description = format!("create varnish server {}", created.id);
        let affected = BTreeSet::from([created.cluster_id]);
        self.commit_write(write, created, affected, description)
            .await
    }

    /// Returns one Varnish server.
    pub async fn get_varnish_server(&self, id: i64) -> Result<VarnishServer> {
        self.fetch_by_id(id).await
    }

    /// Lists Varnish servers in id order, optionally only those of one cluster.
    pub async fn list_varnish_servers(
        &self,
        page_size: i32,
        page_token: &str,
        cluster_id: i64,
    ) -> Result<Page<VarnishServer>> {
        let filter = (cluster_id != 0).then(|| format!("cluster_id = {cluster_id}"));
        self.fetch_page(filter, page_size, page_token).await
    }

    /// Replaces a Varnish server; reloads its old and new cluster.
    pub async fn update_varnish_server(
        &self,
        server: &VarnishServer,
    ) -> Result<WriteOutcome<VarnishServer>> {
        let mut write = self.begin_write().await?;
        let old_cluster = ids(
            &mut write.transaction,
            "SELECT cluster_id FROM varnish_servers WHERE id = $1",
            server.id,
        )
        .await?;
        if old_cluster.is_empty() {
            return Err(Error::NotFound {
                resource: "varnish server",
                id: server.id,
            });
        }
        check_server_references(&mut write.transaction, server, Some(server.id)).await?;
        let row = sqlx::query(&format!(
            "UPDATE varnish_servers SET address = $1, hostname = $2, http_port = $3, \
             admin_port = $4, status = $5, dc_id = $6, template_id = $7, cluster_id = $8, \
             is_canary = $9 WHERE id = $10 RETURNING {SERVER_COLUMNS}"
        ))
        .bind(&server.address)
        .bind(&server.hostname)
        .bind(i64::from(server.http_port.unwrap_or_default()))
        .bind(i64::from(server.admin_port.unwrap_or_default()))
        .bind(i64::from(server.status))
        .bind(server.dc_id)
        .bind(server.template_id)
        .bind(server.cluster_id)
        .bind(i64::from(server.is_canary))
        .bind(server.id)
        .fetch_one(&mut *write.transaction)
        .await?;
        let updated = rows::server(&row)?;
        let mut affected = old_cluster;
        affected.insert(updated.cluster_id);
        let description = format!("update varnish server {}", server.id);
        self.commit_write(write, updated, affected, description)
            .await
    }

    /// Deletes a Varnish server; no other server's VCL changes, so no reload is needed.
    pub async fn delete_varnish_server(&self, id: i64) -> Result<WriteOutcome<()>> {
        let mut write = self.begin_write().await?;
        ensure_exists::<VarnishServer>(&mut write.transaction, id).await?;
        delete_by_id::<VarnishServer>(&mut write.transaction, id).await?;
        let description = format!("delete varnish server {id}");
        self.commit_write(write, (), BTreeSet::new(), description)
            .await
    }

    // ---- directors ----

    /// Creates a director and reloads the clusters that serve it.
    pub async fn create_director(&self, director: &Director) -> Result<WriteOutcome<Director>> {
        let mut write = self.begin_write().await?;
        ensure_unique::<Director>(
            &mut write.transaction,
            "name",
            &director.name,
            None,
            "director.name",
        )
        .await?;
        check_director_clusters(&mut write.transaction, &director.cluster_ids).await?;
        let row = sqlx::query(&format!(
            "INSERT INTO directors (name, service, mode, router, route_expression, active_active, \
             enabled) VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {DIRECTOR_COLUMNS}"
        ))
        .bind(&director.name)
        .bind(&director.service)
        .bind(i64::from(director.mode))
        .bind(i64::from(director.router))
        .bind(&director.route_expression)
        .bind(i64::from(director.active_active.unwrap_or(true)))
        .bind(i64::from(director.enabled.unwrap_or(true)))
        .fetch_one(&mut *write.transaction)
        .await?;
        let mut created = rows::director(&row)?;
        link_director_clusters(&mut write.transaction, created.id, &director.cluster_ids).await?;
        created.cluster_ids = director_cluster_ids(&mut write.transaction, created.id).await?;
        let affected = created.cluster_ids.iter().copied().collect();
        let description = format!("create director {}", created.id);
        self.commit_write(write, created, affected, description)
            .await
    }

    /// Returns one director.
    pub async fn get_director(&self, id: i64) -> Result<Director> {
        let mut director: Director = self.fetch_by_id(id).await?;
        let mut transaction = self.pool.begin().await?;
        director.cluster_ids = director_cluster_ids(&mut transaction, id).await?;
        Ok(director)
    }

    /// Lists directors in id order, optionally only those served by one cluster.
    pub async fn list_directors(
        &self,
        page_size: i32,
        page_token: &str,
        cluster_id: i64,
    ) -> Result<Page<Director>> {
        let filter = (cluster_id != 0).then(|| {
            format!(
                "id IN (SELECT director_id FROM director_clusters WHERE cluster_id = {cluster_id})"
            )
        });
        let (mut directors, next): Page<Director> =
            self.fetch_page(filter, page_size, page_token).await?;
        let mut transaction = self.pool.begin().await?;
        fill_cluster_ids(&mut transaction, &mut directors).await?;
        Ok((directors, next))
    }

    /// Replaces a director; reloads the clusters that served it and that serve it now.
    pub async fn update_director(&self, director: &Director) -> Result<WriteOutcome<Director>> {
        let mut write = self.begin_write().await?;
        ensure_exists::<Director>(&mut write.transaction, director.id).await?;
        ensure_unique::<Director>(
            &mut write.transaction,
            "name",
            &director.name,
            Some(director.id),
            "director.name",
        )
        .await?;
        check_director_clusters(&mut write.transaction, &director.cluster_ids).await?;
        let mut affected: BTreeSet<i64> = director_cluster_ids(&mut write.transaction, director.id)
            .await?
            .into_iter()
            .collect();
        let row = sqlx::query(&format!(
            "UPDATE directors SET name = $1, service = $2, mode = $3, router = $4, \
             route_expression = $5, active_active = $6, enabled = $7 WHERE id = $8 \
             RETURNING {DIRECTOR_COLUMNS}"
        ))
        .bind(&director.name)
        .bind(&director.service)
        .bind(i64::from(director.mode))
        .bind(i64::from(director.router))
        .bind(&director.route_expression)
        .bind(i64::from(director.active_active.unwrap_or(true)))
        .bind(i64::from(director.enabled.unwrap_or(true)))
        .bind(director.id)
        .fetch_one(&mut *write.transaction)
        .await?;
        let mut updated = rows::director(&row)?;
        sqlx::query("DELETE FROM director_clusters WHERE director_id = $1")
            .bind(director.id)
            .execute(&mut *write.transaction)
            .await?;
        link_director_clusters(&mut write.transaction, director.id, &director.cluster_ids).await?;
        updated.cluster_ids = director_cluster_ids(&mut write.transaction, director.id).await?;
        affected.extend(updated.cluster_ids.iter().copied());
        let description = format!("update director {}", director.id);
        self.commit_write(write, updated, affected, description)
            .await
    }

    /// Deletes a director that has no backends; reloads the clusters that served it.
    pub async fn delete_director(&self, id: i64) -> Result<WriteOutcome<()>> {
        let mut write = self.begin_write().await?;
        ensure_exists::<Director>(&mut write.transaction, id).await?;
        ensure_unused(
            &mut write.transaction,
            "director",
            id,
            "backends",
            "director_id",
        )
        .await?;
        let affected = director_cluster_ids(&mut write.transaction, id)
            .await?
            .into_iter()
            .collect();
        delete_by_id::<Director>(&mut write.transaction, id).await?;
        self.commit_write(write, (), affected, format!("delete director {id}"))
            .await
    }

    // ---- backends ----

    /// Creates a backend and reloads the clusters that serve its director.
    pub async fn create_backend(&self, backend: &Backend) -> Result<WriteOutcome<Backend>> {
        let mut write = self.begin_write().await?;
        check_backend_references(&mut write.transaction, backend, None).await?;
        let sql = format!(
            "INSERT INTO backends (director_id, dc_id, address, port, weight, max_connections, \
             connect_timeout_micros, first_byte_timeout_micros, between_bytes_timeout_micros, \
             enabled, tags) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             RETURNING {BACKEND_COLUMNS}"
        );
        let row = bind_backend(sqlx::query(&sql), backend)
            .fetch_one(&mut *write.transaction)
            .await?;
        let created = rows::backend(&row)?;
        let affected = director_cluster_ids(&mut write.transaction, created.director_id)
            .await?
            .into_iter()
            .collect();
        let description = format!("create backend {}", created.id);
        self.commit_write(write, created, affected, description)
            .await
    }

    /// Returns one backend.
    pub async fn get_backend(&self, id: i64) -> Result<Backend> {
        self.fetch_by_id(id).await
    }

    /// Lists backends in id order, optionally only those of one director.
    pub async fn list_backends(
        &self,
        page_size: i32,
        page_token: &str,
        director_id: i64,
    ) -> Result<Page<Backend>> {
        let filter = (director_id != 0).then(|| format!("director_id = {director_id}"));
        self.fetch_page(filter, page_size, page_token).await
    }

    /// Replaces a backend; reloads the clusters of its old and new director.
    pub async fn update_backend(&self, backend: &Backend) -> Result<WriteOutcome<Backend>> {
        let mut write = self.begin_write().await?;
        let old_director = ids(
            &mut write.transaction,
            "SELECT director_id FROM backends WHERE id = $1",
            backend.id,
        )
        .await?;
        let Some(&old_director) = old_director.first() else {
            return Err(Error::NotFound {
                resource: "backend",
                id: backend.id,
            });
        };
        check_backend_references(&mut write.transaction, backend, Some(backend.id)).await?;
        let sql = format!(
            "UPDATE backends SET director_id = $1, dc_id = $2, address = $3, port = $4, \
             weight = $5, max_connections = $6, connect_timeout_micros = $7, \
             first_byte_timeout_micros = $8, between_bytes_timeout_micros = $9, enabled = $10, \
             tags = $11 WHERE id = $12 RETURNING {BACKEND_COLUMNS}"
        );
        let row = bind_backend(sqlx::query(&sql), backend)
            .bind(backend.id)
            .fetch_one(&mut *write.transaction)
            .await?;
        let updated = rows::backend(&row)?;
        let mut affected: BTreeSet<i64> =
            director_cluster_ids(&mut write.transaction, old_director)
                .await?
                .into_iter()
                .collect();
        affected.extend(director_cluster_ids(&mut write.transaction, updated.director_id).await?);
        let description = format!("update backend {}", backend.id);
        self.commit_write(write, updated, affected, description)
            .await
    }

    /// Deletes a backend; reloads the clusters of its director.
    pub async fn delete_backend(&self, id: i64) -> Result<WriteOutcome<()>> {
        let mut write = self.begin_write().await?;
        let director = ids(
            &mut write.transaction,
            "SELECT director_id FROM backends WHERE id = $1",
            id,
        )
        .await?;
        let Some(&director) = director.first() else {
            return Err(Error::NotFound {
                resource: "backend",
                id,
            });
        };
        let affected = director_cluster_ids(&mut write.transaction, director)
            .await?
            .into_iter()
            .collect();
        delete_by_id::<Backend>(&mut write.transaction, id).await?;
        self.commit_write(write, (), affected, format!("delete backend {id}"))
            .await
    }

    // ---- shared reads ----

    async fn fetch_by_id<T: Stored>(&self, id: i64) -> Result<T> {
        let row = sqlx::query(&format!(
            "SELECT {} FROM {} WHERE id = $1",
            T::COLUMNS,
            T::TABLE
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(Error::NotFound {
            resource: T::RESOURCE,
            id,
        })?;
        T::from_row(&row)
    }

    /// Fetches one page in id order; `filter` is SQL built only from integers.
    async fn fetch_page<T: Stored>(
        &self,
        filter: Option<String>,
        page_size: i32,
        page_token: &str,
    ) -> Result<Page<T>> {
        let limit = page_limit(page_size);
        let after = parse_page_token(page_token)?;
        let filter = filter.map(|sql| format!("AND {sql}")).unwrap_or_default();
        let rows = sqlx::query(&format!(
            "SELECT {} FROM {} WHERE id > $1 {filter} ORDER BY id LIMIT $2",
            T::COLUMNS,
            T::TABLE
        ))
        .bind(after)
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await?;
        let (rows, next) = cut_page(rows, limit, |row| sqlx::Row::try_get::<i64, _>(row, "id"));
        Ok((rows.iter().map(T::from_row).collect::<Result<_>>()?, next))
    }
}

/// Returns the number of items a page holds: 100 by default, at most 1000.
pub(crate) fn page_limit(page_size: i32) -> i64 {
    match page_size {
        size if size <= 0 => 100,
        size => i64::from(size.min(1000)),
    }
}

/// Parses a page token handed out by this store: the last key of the previous page.
pub(crate) fn parse_page_token(token: &str) -> Result<i64> {
    if token.is_empty() {
        return Ok(0);
    }
    token.parse().map_err(|_| Error::InvalidPageToken)
}

/// Keeps `limit` rows and, when there were more, returns the last kept key as the next token.
pub(crate) fn cut_page(
    mut rows: Vec<AnyRow>,
    limit: i64,
    key: impl Fn(&AnyRow) -> std::result::Result<i64, sqlx::Error>,
) -> (Vec<AnyRow>, String) {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    if rows.len() <= limit {
        return (rows, String::new());
    }
    rows.truncate(limit);
    let next = rows
        .last()
        .and_then(|row| key(row).ok())
        .map(|key| key.to_string())
        .unwrap_or_default();
    (rows, next)
}

fn bind_backend<'q>(
    query: sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>,
    backend: &'q Backend,
) -> sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>> {
    let micros = |duration: &Option<prost_types::Duration>| {
        duration.as_ref().map(duration_micros).unwrap_or_default()
    };
    query
        .bind(backend.director_id)
        .bind(backend.dc_id)
        .bind(&backend.address)
        .bind(i64::from(backend.port.unwrap_or_default()))
        .bind(i64::from(backend.weight.unwrap_or_default()))
        .bind(i64::from(backend.max_connections.unwrap_or_default()))
        .bind(micros(&backend.connect_timeout))
        .bind(micros(&backend.first_byte_timeout))
        .bind(micros(&backend.between_bytes_timeout))
        .bind(i64::from(backend.enabled.unwrap_or(true)))
        .bind(join_list(&backend.tags))
}

async fn ids(transaction: &mut Transaction<'_, Any>, sql: &str, id: i64) -> Result<BTreeSet<i64>> {
    let ids: Vec<i64> = sqlx::query_scalar(sql)
        .bind(id)
        .fetch_all(&mut **transaction)
        .await?;
    Ok(ids.into_iter().collect())
}

async fn ensure_exists<T: Stored>(transaction: &mut Transaction<'_, Any>, id: i64) -> Result<()> {
    let found: Option<i64> =
        sqlx::query_scalar(&format!("SELECT id FROM {} WHERE id = $1", T::TABLE))
            .bind(id)
            .fetch_optional(&mut **transaction)
            .await?;
    found.map(|_| ()).ok_or(Error::NotFound {
        resource: T::RESOURCE,
        id,
    })
}

async fn ensure_reference<T: Stored>(
    transaction: &mut Transaction<'_, Any>,
    field: &'static str,
    id: i64,
) -> Result<()> {
    ensure_exists::<T>(transaction, id)
        .await
        .map_err(|error| match error {
            Error::NotFound { resource, id } => Error::MissingReference {
                field,
                resource,
                id,
            },
            other => other,
        })
}

async fn ensure_unique<T: Stored>(
    transaction: &mut Transaction<'_, Any>,
    column: &str,
    value: &str,
    except_id: Option<i64>,
    field: &'static str,
) -> Result<()> {
    let taken: Option<i64> = sqlx::query_scalar(&format!(
        "SELECT id FROM {} WHERE {column} = $1 AND id <> $2",
        T::TABLE
    ))
    .bind(value)
    .bind(except_id.unwrap_or(0))
    .fetch_optional(&mut **transaction)
    .await?;
    match taken {
        Some(_) => Err(Error::AlreadyExists {
            field,
            value: value.to_owned(),
        }),
        None => Ok(()),
    }
}

/// Rejects a symbol that equals another after "-" becomes "_" (they would collide in VCL).
async fn ensure_dc_symbol_free(
    transaction: &mut Transaction<'_, Any>,
    symbol: &str,
    except_id: Option<i64>,
) -> Result<()> {
    let vcl_symbol = |symbol: &str| symbol.replace('-', "_");
    let others: Vec<(i64, String)> = sqlx::query_as("SELECT id, symbol FROM dcs")
        .fetch_all(&mut **transaction)
        .await?;
    let collides = others
        .iter()
        .any(|(id, other)| Some(*id) != except_id && vcl_symbol(other) == vcl_symbol(symbol));
    if collides {
        return Err(Error::AlreadyExists {
            field: "dc.symbol",
            value: symbol.to_owned(),
        });
    }
    Ok(())
}

async fn ensure_unused(
    transaction: &mut Transaction<'_, Any>,
    resource: &'static str,
    id: i64,
    table: &str,
    column: &str,
) -> Result<()> {
    let count: i64 =
        sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table} WHERE {column} = $1"))
            .bind(id)
            .fetch_one(&mut **transaction)
            .await?;
    if count > 0 {
        return Err(Error::InUse {
            resource,
            id,
            users: format!("{count} {}", table.replace('_', " ")),
        });
    }
    Ok(())
}

async fn delete_by_id<T: Stored>(transaction: &mut Transaction<'_, Any>, id: i64) -> Result<()> {
    sqlx::query(&format!("DELETE FROM {} WHERE id = $1", T::TABLE))
        .bind(id)
        .execute(&mut **transaction)
        .await?;
    Ok(())
}

async fn check_server_references(
    transaction: &mut Transaction<'_, Any>,
    server: &VarnishServer,
    except_id: Option<i64>,
) -> Result<()> {
    ensure_reference::<Dc>(transaction, "varnish_server.dc_id", server.dc_id).await?;
    ensure_reference::<VclTemplate>(
        transaction,
        "varnish_server.template_id",
        server.template_id,
    )
    .await?;
    ensure_reference::<Cluster>(transaction, "varnish_server.cluster_id", server.cluster_id)
        .await?;
    let taken: Option<i64> = sqlx::query_scalar(
        "SELECT id FROM varnish_servers WHERE address = $1 AND admin_port = $2 AND id <> $3",
    )
    .bind(&server.address)
    .bind(i64::from(server.admin_port.unwrap_or_default()))
    .bind(except_id.unwrap_or(0))
    .fetch_optional(&mut **transaction)
    .await?;
    if taken.is_some() {
        return Err(Error::AlreadyExists {
            field: "varnish_server.admin_port",
            value: format!(
                "{} port {}",
                server.address,
                server.admin_port.unwrap_or_default()
            ),
        });
    }
    Ok(())
}

async fn check_backend_references(
    transaction: &mut Transaction<'_, Any>,
    backend: &Backend,
    except_id: Option<i64>,
) -> Result<()> {
    ensure_reference::<Director>(transaction, "backend.director_id", backend.director_id).await?;
    ensure_reference::<Dc>(transaction, "backend.dc_id", backend.dc_id).await?;
    let taken: Option<i64> = sqlx::query_scalar(
        "SELECT id FROM backends WHERE address = $1 AND port = $2 AND director_id = $3 \
         AND id <> $4",
    )
    .bind(&backend.address)
    .bind(i64::from(backend.port.unwrap_or_default()))
    .bind(backend.director_id)
    .bind(except_id.unwrap_or(0))
    .fetch_optional(&mut **transaction)
    .await?;
    if taken.is_some() {
        return Err(Error::AlreadyExists {
            field: "backend.address",
            value: format!(
                "{} port {}",
                backend.address,
                backend.port.unwrap_or_default()
            ),
        });
    }
    Ok(())
}

async fn check_director_clusters(
    transaction: &mut Transaction<'_, Any>,
    cluster_ids: &[i64],
) -> Result<()> {
    for &cluster_id in cluster_ids {
        ensure_reference::<Cluster>(transaction, "director.cluster_ids", cluster_id).await?;
    }
    Ok(())
}

async fn link_director_clusters(
    transaction: &mut Transaction<'_, Any>,
    director_id: i64,
    cluster_ids: &[i64],
) -> Result<()> {
    let unique: BTreeSet<i64> = cluster_ids.iter().copied().collect();
    for cluster_id in unique {
        sqlx::query("INSERT INTO director_clusters (director_id, cluster_id) VALUES ($1, $2)")
            .bind(director_id)
            .bind(cluster_id)
            .execute(&mut **transaction)
            .await?;
    }
    Ok(())
}

/// Sets the `cluster_ids` of directors read from their own table.
pub(crate) async fn fill_cluster_ids(
    transaction: &mut Transaction<'_, Any>,
    directors: &mut [Director],
) -> Result<()> {
    for director in directors {
        director.cluster_ids = director_cluster_ids(transaction, director.id).await?;
    }
    Ok(())
}

pub(crate) async fn director_cluster_ids(
    transaction: &mut Transaction<'_, Any>,
    director_id: i64,
) -> Result<Vec<i64>> {
    let ids: Vec<i64> = sqlx::query_scalar(
        "SELECT cluster_id FROM director_clusters WHERE director_id = $1 ORDER BY cluster_id",
    )
    .bind(director_id)
    .fetch_all(&mut **transaction)
    .await?;
    Ok(ids)
}
