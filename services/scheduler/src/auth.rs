//! Who may attach: only an agent, with a token bound to one registered Varnish server, and only
//! as that server. The token is checked by [`vaas_runtime::auth::AuthLayer`] before the stream
//! opens; [`bound_server`] then checks the hello against the server the token is bound to.

use tonic::Status;
use vaas_proto::v1::{AccessToken, AgentHello, Role, ServerStatus, VarnishServer};
use vaas_runtime::auth::{Authenticator, Caller};
use vaas_store::{Authentication, Store};

/// The one method that needs a credential.
const ATTACH: &str = "/vaas.v1.AgentService/Attach";

/// Admits agents with a valid agent token; health and reflection stay open.
#[derive(Clone, Debug)]
pub struct AgentAuthenticator {
    store: Store,
}

impl AgentAuthenticator {
    /// Returns an authenticator over `store`'s tokens.
    pub fn new(store: Store) -> AgentAuthenticator {
        AgentAuthenticator { store }
    }
}

impl Authenticator for AgentAuthenticator {
    async fn authenticate(
        &self,
        path: String,
        bearer: Option<String>,
    ) -> Result<Option<Caller>, Status> {
        if vaas_runtime::auth::is_open(&path) {
            return Ok(None);
        }
        if path != ATTACH {
            return Err(Status::permission_denied(format!(
                "{path} is not served to anyone"
            )));
        }
        let token = vaas_runtime::auth::check_token(bearer, |secret| async move {
            self.store
                .authenticate(&secret)
                .await
                .map(Authentication::valid)
        })
        .await?;
        if token.role != Role::Agent as i32 {
            return Err(Status::permission_denied(format!(
                "token {:?} is not an agent token; only agents attach",
                token.name
            )));
        }
        Ok(Some(Caller { token }))
    }
}

/// Returns the server an agent token is bound to, if the hello names that server and it is
/// registered and not disabled; PERMISSION_DENIED otherwise.
pub async fn bound_server(
    store: &Store,
    token: &AccessToken,
    hello: &AgentHello,
) -> Result<VarnishServer, Status> {
    let server_id = token.varnish_server_id;
    let server = match store.get::<VarnishServer>(server_id).await {
        Ok(server) => server,
        Err(vaas_store::Error::NotFound { .. }) => {
            return Err(Status::permission_denied(format!(
                "token {:?} is bound to varnish server {server_id}, which is no longer registered",
                token.name
            )));
        }
        Err(error) => {
            tracing::warn!(%error, server = server_id, "cannot read an attaching agent's server");
            return Err(Status::unavailable(
                "cannot read the server now: the store is unavailable",
            ));
        }
    };
    if server.status == ServerStatus::Disabled as i32
        || server.status == ServerStatus::Unspecified as i32
    {
        return Err(Status::permission_denied(format!(
            "varnish server {server_id} is disabled; enable it before its agent attaches"
        )));
    }
    let admin_port = server.admin_port.unwrap_or_default();
    if server.address != hello.address || admin_port != hello.admin_port {
        return Err(Status::permission_denied(format!(
            "token {:?} belongs to varnish server {server_id} ({} admin port {admin_port}); \
             it cannot attach as {} admin port {}",
            token.name, server.address, hello.address, hello.admin_port
        )));
    }
    Ok(server)
}
