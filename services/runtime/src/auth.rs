//! Authentication of gRPC calls, as one tower layer in front of every service of a server.
//!
//! The layer reads the bearer token from the `authorization` metadata and asks the server's
//! [`Authenticator`] whether the call may proceed. An admitted call carries the [`Caller`] in its
//! request extensions, where handlers find it (for the audit history, or to bind an agent to its
//! server); a refused call is answered with the authenticator's status and never reaches a
//! handler. Which calls need which credential is each server's policy; this module only enforces
//! it, so no handler can forget to.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::Status;
use tonic::body::Body;
use vaas_proto::v1::AccessToken;

/// Who made an admitted call.
#[derive(Clone, Debug, PartialEq)]
pub struct Caller {
    /// The token the call was made with.
    pub token: AccessToken,
}

/// Decides whether a call may proceed; each server has its own policy.
pub trait Authenticator: Clone + Send + Sync + 'static {
    /// Decides a call to `path` (`/package.Service/Method`) made with `bearer` (the token from
    /// `authorization: Bearer <token>`, if any): `Ok(None)` lets an open call through without a
    /// caller, `Ok(Some(caller))` admits it, `Err(status)` refuses it.
    fn authenticate(
        &self,
        path: String,
        bearer: Option<String>,
    ) -> impl Future<Output = Result<Option<Caller>, Status>> + Send;
}

/// The tower layer that puts an [`Authenticator`] in front of a server's services.
#[derive(Clone, Debug)]
pub struct AuthLayer<A> {
    authenticator: A,
}

impl<A> AuthLayer<A> {
    /// Returns a layer enforcing `authenticator`.
    pub fn new(authenticator: A) -> AuthLayer<A> {
        AuthLayer { authenticator }
    }
}

impl<S, A: Clone> tower_layer::Layer<S> for AuthLayer<A> {
    type Service = Authenticated<S, A>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticated {
            inner,
            authenticator: self.authenticator.clone(),
        }
    }
}

/// A service behind an [`AuthLayer`].
#[derive(Clone, Debug)]
pub struct Authenticated<S, A> {
    inner: S,
    authenticator: A,
}

impl<S, A, B> tower_service::Service<http::Request<B>> for Authenticated<S, A>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    A: Authenticator,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone is not ready yet: call the instance that was polled, keep the clone.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        let authenticator = self.authenticator.clone();
        Box::pin(async move {
            let path = request.uri().path().to_owned();
            let decision = match bearer(request.headers()) {
                Ok(bearer) => authenticator.authenticate(path, bearer).await,
                Err(status) => Err(status),
            };
            match decision {
                Ok(caller) => {
                    if let Some(caller) = caller {
                        request.extensions_mut().insert(caller);
                    }
                    inner.call(request).await
                }
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

/// Returns the token of an `authorization: Bearer <token>` header, `None` without the header.
fn bearer(headers: &http::HeaderMap) -> Result<Option<String>, Status> {
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let malformed =
        || Status::unauthenticated("the authorization metadata must be \"Bearer <token>\"");
    let value = value.to_str().map_err(|_| malformed())?;
    let (scheme, token) = value.trim().split_once(' ').ok_or_else(malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(malformed());
    }
    Ok(Some(token.to_owned()))
}

/// Returns the token of a presented `bearer` secret if `look_up` finds a working one:
/// UNAUTHENTICATED without a secret (the message tells how to send one) or with one that does
/// not work (`look_up`'s reason), UNAVAILABLE when the lookup itself fails.
pub async fn check_token<F, E>(
    bearer: Option<String>,
    look_up: impl FnOnce(String) -> F,
) -> Result<AccessToken, Status>
where
    F: Future<Output = Result<Result<AccessToken, String>, E>>,
    E: std::fmt::Display,
{
    let Some(secret) = bearer else {
        return Err(Status::unauthenticated(
            "this call needs a token: send the metadata \"authorization: Bearer <token>\"",
        ));
    };
    match look_up(secret).await {
        Ok(checked) => checked.map_err(Status::unauthenticated),
        Err(error) => {
            tracing::warn!(%error, "cannot check a token");
            Err(Status::unavailable(
                "cannot check the token now: the store is unavailable",
            ))
        }
    }
}

/// Whether a method is open to every caller: gRPC health and reflection, which load balancers,
/// probes and tools such as grpcurl call before they have a credential.
pub fn is_open(path: &str) -> bool {
    [
        "/grpc.health.v1.Health/",
        "/grpc.reflection.v1.ServerReflection/",
        "/grpc.reflection.v1alpha.ServerReflection/",
    ]
    .iter()
    .any(|service| path.starts_with(service))
}

/// Returns the caller of an admitted request (`None` for an open call).
pub fn caller<T>(request: &tonic::Request<T>) -> Option<&Caller> {
    request.extensions().get::<Caller>()
}

#[cfg(test)]
mod tests {
    use super::bearer;

    fn headers(value: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_str(value).expect("a valid header value"),
        );
        headers
    }

    #[test]
    fn a_bearer_token_is_read_whatever_the_scheme_case() {
        let read = |headers: &http::HeaderMap| bearer(headers).expect("a well-formed header");
        assert_eq!(read(&headers("Bearer abc")), Some("abc".to_owned()));
        assert_eq!(read(&headers("bearer  abc ")), Some("abc".to_owned()));
        assert_eq!(read(&http::HeaderMap::new()), None);
    }

    #[test]
    fn another_scheme_or_an_empty_token_is_refused() {
        for value in ["Basic abc", "Bearer", "Bearer   ", "abc"] {
            let status = bearer(&headers(value)).expect_err(value);
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{value}");
        }
    }
}
