//! The TokenService: admins issue, list and revoke the tokens of API callers and agents; any
//! caller may ask who it is.

use std::time::Duration;

use tonic::{Request, Response, Status};
use tracing::{info, instrument};
use vaas_proto::v1::token_service_server::TokenService;
use vaas_proto::v1::{
    CreateTokenRequest, CreateTokenResponse, ListTokensRequest, ListTokensResponse,
    RevokeTokenRequest, RevokeTokenResponse, Role, WhoAmIRequest, WhoAmIResponse,
};
use vaas_store::{NewToken, Store};

use crate::error::ApiError;

/// How long a token works when the request does not say.
pub const DEFAULT_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// The shortest lifetime a token may be given.
pub const MIN_TTL: Duration = Duration::from_secs(1);
/// The longest lifetime a token may be given: tokens are rotated at least yearly.
pub const MAX_TTL: Duration = Duration::from_secs(366 * 24 * 3600);
/// The longest token name.
pub const MAX_NAME_CHARS: usize = 64;

/// The TokenService implementation.
#[derive(Clone, Debug)]
pub struct TokenApi {
    store: Store,
}

impl TokenApi {
    /// Creates the service over `store`'s tokens.
    pub fn new(store: Store) -> TokenApi {
        TokenApi { store }
    }
}

/// Checks a create request and returns what the store needs.
pub fn new_token(request: &CreateTokenRequest) -> Result<NewToken, ApiError> {
    let name = request.name.trim();
    let name_ok = (1..=MAX_NAME_CHARS).contains(&name.chars().count())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '@'));
    if !name_ok {
        return Err(ApiError::invalid(
            "name",
            format!("must be 1 to {MAX_NAME_CHARS} letters, digits and \".-_@\""),
        ));
    }
    let role = match Role::try_from(request.role) {
        Ok(Role::Unspecified) | Err(_) => {
            return Err(ApiError::invalid(
                "role",
                "must be ROLE_READER, ROLE_EDITOR, ROLE_ADMIN or ROLE_AGENT",
            ));
        }
        Ok(role) => role,
    };
    match (role, request.varnish_server_id) {
        (Role::Agent, id) if id <= 0 => {
            return Err(ApiError::invalid(
                "varnish_server_id",
                "an agent token is bound to one Varnish server: give its id",
            ));
        }
        (Role::Agent, _) | (_, 0) => {}
        _ => {
            return Err(ApiError::invalid(
                "varnish_server_id",
                "only agent tokens are bound to a Varnish server",
            ));
        }
    }
    let ttl = match &request.ttl {
        None => DEFAULT_TTL,
        Some(ttl) => u64::try_from(ttl.seconds)
            .ok()
            .filter(|_| ttl.nanos >= 0)
            .map(Duration::from_secs)
            .filter(|ttl| (MIN_TTL..=MAX_TTL).contains(ttl))
            .ok_or_else(|| ApiError::invalid("ttl", "must be from 1 second to 366 days"))?,
    };
    Ok(NewToken {
        name: name.to_owned(),
        role,
        varnish_server_id: request.varnish_server_id,
        ttl,
    })
}

/// Flags of `vaas-api create-token`, which creates a token directly in the store: the first
/// admin token of a new installation, or the way back in when every admin token is lost.
/// Whoever can write the store can do this anyway, so it opens no new door.
#[derive(Clone, Debug, clap::Args)]
pub struct CreateTokenArgs {
    /// Store URL, as for the server.
    #[arg(
        long,
        env = "VAAS_DATABASE_URL",
        default_value = "sqlite://vaas.db?mode=rwc"
    )]
    pub database_url: String,
    /// The token's unique name, recorded as the actor of its changes.
    #[arg(long)]
    pub name: String,
    /// What the token allows.
    #[arg(long, value_parser = ["reader", "editor", "admin", "agent"])]
    pub role: String,
    /// For an agent token: the id of its Varnish server.
    #[arg(long, default_value_t = 0)]
    pub varnish_server_id: i64,
    /// How long the token works (1s to 366d).
    #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
}

/// Creates a token as `vaas-api create-token` asks and returns it with its secret; the error is
/// one line for the operator.
pub async fn create_token_in_store(
    args: &CreateTokenArgs,
) -> Result<(vaas_proto::v1::AccessToken, String), String> {
    let role = match args.role.as_str() {
        "reader" => Role::Reader,
        "editor" => Role::Editor,
        "admin" => Role::Admin,
        _ => Role::Agent,
    };
    let request = CreateTokenRequest {
        name: args.name.clone(),
        role: role as i32,
        varnish_server_id: args.varnish_server_id,
        ttl: Some(prost_types::Duration {
            seconds: i64::try_from(args.ttl.as_secs()).unwrap_or(i64::MAX),
            nanos: 0,
        }),
    };
    let flag = |field: &str| format!("--{}", field.replace('_', "-"));
    let new = new_token(&request).map_err(|error| match error {
        ApiError::InvalidArgument(violations) => violations
            .iter()
            .map(|violation| format!("{} {}", flag(&violation.field), violation.description))
            .collect::<Vec<_>>()
            .join("; "),
        other => other.to_string(),
    })?;
    let store = Store::connect(&args.database_url)
        .await
        .map_err(|error| format!("cannot open the store: {error}"))?;
    let created = store
        .acting_as("vaas-api create-token")
        .create_token(&new)
        .await
        .map_err(|error| match error {
            vaas_store::Error::AlreadyExists { value, .. } => {
                format!("a token named {value:?} exists already")
            }
            vaas_store::Error::MissingReference { id, .. } => {
                format!("--varnish-server-id {id}: no such Varnish server")
            }
            other => format!("cannot create the token: {other}"),
        });
    store.close().await;
    created
}

/// Returns who makes a call, as the audit history records it: the name of the caller's token.
pub fn actor<T>(request: &Request<T>) -> String {
    match vaas_runtime::auth::caller(request) {
        Some(caller) => caller.token.name.clone(),
        // Only open methods (health, reflection) run without a caller, and they write nothing.
        None => "anonymous".to_owned(),
    }
}

#[tonic::async_trait]
impl TokenService for TokenApi {
    #[instrument(skip_all, fields(rpc = "CreateToken"))]
    async fn create_token(
        &self,
        request: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let actor = actor(&request);
        let new = new_token(request.get_ref())?;
        let (token, secret) = self
            .store
            .acting_as(&actor)
            .create_token(&new)
            .await
            .map_err(ApiError::from)?;
        info!(token = token.id, name = %token.name, role = token.role, by = %actor, "token created");
        Ok(Response::new(CreateTokenResponse {
            token: Some(token),
            secret,
        }))
    }

    #[instrument(skip_all, fields(rpc = "ListTokens"))]
    async fn list_tokens(
        &self,
        request: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        let request = request.into_inner();
        let (tokens, next_page_token) = self
            .store
            .list_tokens(request.page_size, &request.page_token)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(ListTokensResponse {
            tokens,
            next_page_token,
        }))
    }

    #[instrument(skip_all, fields(rpc = "RevokeToken"))]
    async fn revoke_token(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        let actor = actor(&request);
        let id = request.get_ref().id;
        let token = self
            .store
            .acting_as(&actor)
            .revoke_token(id)
            .await
            .map_err(ApiError::from)?;
        info!(token = token.id, name = %token.name, by = %actor, "token revoked");
        Ok(Response::new(RevokeTokenResponse { token: Some(token) }))
    }

    #[instrument(skip_all, fields(rpc = "WhoAmI"))]
    async fn who_am_i(
        &self,
        request: Request<WhoAmIRequest>,
    ) -> Result<Response<WhoAmIResponse>, Status> {
        let token = vaas_runtime::auth::caller(&request)
            .map(|caller| caller.token.clone())
            .ok_or_else(|| Status::unauthenticated("this call needs a token"))?;
        Ok(Response::new(WhoAmIResponse { token: Some(token) }))
    }
}

#[cfg(test)]
mod tests {
    use vaas_proto::v1::{CreateTokenRequest, Role};

    use super::new_token;

    fn request(
        name: &str,
        role: Role,
        server: i64,
        ttl_seconds: Option<i64>,
    ) -> CreateTokenRequest {
        CreateTokenRequest {
            name: name.into(),
            role: role as i32,
            varnish_server_id: server,
            ttl: ttl_seconds.map(|seconds| prost_types::Duration { seconds, nanos: 0 }),
        }
    }

    fn refused_field(request: &CreateTokenRequest) -> String {
        match new_token(request) {
            Err(crate::error::ApiError::InvalidArgument(violations)) => violations[0].field.clone(),
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_request_keeps_its_fields_and_gets_the_default_lifetime() {
        let new = new_token(&request("ci@deploy", Role::Editor, 0, None)).expect("valid");
        assert_eq!(new.name, "ci@deploy");
        assert_eq!(new.role, Role::Editor);
        assert_eq!(new.ttl, super::DEFAULT_TTL);
        let agent = new_token(&request("agent-7", Role::Agent, 7, Some(3600))).expect("valid");
        assert_eq!(agent.varnish_server_id, 7);
        assert_eq!(agent.ttl.as_secs(), 3600);
    }

    #[test]
    fn bad_names_roles_bindings_and_lifetimes_are_refused_with_their_field() {
        assert_eq!(refused_field(&request("", Role::Admin, 0, None)), "name");
        assert_eq!(refused_field(&request("a b", Role::Admin, 0, None)), "name");
        assert_eq!(
            refused_field(&request(&"a".repeat(65), Role::Admin, 0, None)),
            "name"
        );
        assert_eq!(
            refused_field(&request("x", Role::Unspecified, 0, None)),
            "role"
        );
        assert_eq!(
            refused_field(&request("x", Role::Agent, 0, None)),
            "varnish_server_id"
        );
        assert_eq!(
            refused_field(&request("x", Role::Admin, 3, None)),
            "varnish_server_id"
        );
        assert_eq!(refused_field(&request("x", Role::Admin, 0, Some(0))), "ttl");
        assert_eq!(
            refused_field(&request("x", Role::Admin, 0, Some(400 * 86400))),
            "ttl"
        );
    }
}
