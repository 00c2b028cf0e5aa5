//! Who may call what on the API: every call but gRPC health and reflection needs a valid token,
//! and each method needs a role. Enforced by [`vaas_runtime::auth::AuthLayer`] in front of every
//! service, so no handler can forget it.
//!
//! Readers read everything; editors also change what routes traffic (datacenters, clusters,
//! directors, backends, probes, time profiles, VCL variables, routes, domain mappings and
//! redirects, none of which is raw VCL); only admins change what runs on
//! the Varnish hosts (VCL templates and template blocks are raw VCL, servers are where it runs)
//! and manage tokens. A method this table does not know needs admin.

use tonic::Status;
use vaas_proto::v1::Role;
use vaas_runtime::auth::{Authenticator, Caller};
use vaas_store::{Authentication, Store};

/// Resources only admins may change.
const ADMIN_RESOURCES: &[&str] = &["VclTemplate", "VclTemplateBlock", "VarnishServer"];

/// Verbs of methods that only read.
const READ_VERBS: &[&str] = &["Get", "List", "Watch", "Diff"];

/// Returns the role a method needs, or `None` for a method open to everyone.
pub fn required_role(path: &str) -> Option<Role> {
    if vaas_runtime::auth::is_open(path) {
        return None;
    }
    let (service, method) = path
        .strip_prefix('/')
        .and_then(|path| path.split_once('/'))
        .unwrap_or((path, ""));
    match service {
        "vaas.v1.TaskService" | "vaas.v1.StatusService" => Some(Role::Reader),
        "vaas.v1.TokenService" if method == "WhoAmI" => Some(Role::Reader),
        "vaas.v1.ConfigService" => Some(config_role(method)),
        _ => Some(Role::Admin),
    }
}

/// The role a ConfigService method needs, from its verb and resource.
fn config_role(method: &str) -> Role {
    let verb_end = method
        .char_indices()
        .skip(1)
        .find(|(_, c)| c.is_ascii_uppercase())
        .map_or(method.len(), |(index, _)| index);
    let (verb, resource) = method.split_at(verb_end);
    if READ_VERBS.contains(&verb) {
        Role::Reader
    } else if ADMIN_RESOURCES.contains(&resource.trim_end_matches('s')) {
        Role::Admin
    } else {
        Role::Editor
    }
}

/// Whether a token of role `held` may call a method that needs `needed`.
pub fn allows(held: Role, needed: Role) -> bool {
    let rank = |role: Role| match role {
        Role::Reader => 1,
        Role::Editor => 2,
        Role::Admin => 3,
        // Agents speak only to the scheduler.
        Role::Agent | Role::Unspecified => 0,
    };
    rank(held) > 0 && rank(held) >= rank(needed)
}

/// Returns a role's name as operators write it ("reader", "editor", "admin", "agent").
pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Reader => "reader",
        Role::Editor => "editor",
        Role::Admin => "admin",
        Role::Agent => "agent",
        Role::Unspecified => "unspecified",
    }
}

/// Checks presented secrets against the store's tokens.
#[derive(Clone, Debug)]
pub struct ApiAuthenticator {
    store: Store,
}

impl ApiAuthenticator {
    /// Returns an authenticator over `store`'s tokens.
    pub fn new(store: Store) -> ApiAuthenticator {
        ApiAuthenticator { store }
    }
}

impl Authenticator for ApiAuthenticator {
    async fn authenticate(
        &self,
        path: String,
        bearer: Option<String>,
    ) -> Result<Option<Caller>, Status> {
        let Some(needed) = required_role(&path) else {
            return Ok(None);
        };
        let token = vaas_runtime::auth::check_token(bearer, |secret| async move {
            self.store
                .authenticate(&secret)
                .await
                .map(Authentication::valid)
        })
        .await?;
        let held = Role::try_from(token.role).unwrap_or(Role::Unspecified);
        if !allows(held, needed) {
            return Err(Status::permission_denied(format!(
                "token {:?} has role {}; {path} needs {}",
                token.name,
                role_name(held),
                role_name(needed),
            )));
        }
        Ok(Some(Caller { token }))
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use prost_types::FileDescriptorSet;
    use vaas_proto::v1::Role;

    use super::{allows, required_role};

    #[test]
    fn health_and_reflection_are_open_and_everything_else_needs_a_role() {
        assert_eq!(required_role("/grpc.health.v1.Health/Check"), None);
        assert_eq!(
            required_role("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
            None
        );
        assert_eq!(required_role("/unknown.Service/Call"), Some(Role::Admin));
        assert_eq!(required_role("garbage"), Some(Role::Admin));
    }

    #[test]
    fn every_vaas_method_needs_the_role_its_effect_calls_for() {
        let descriptors = FileDescriptorSet::decode(vaas_proto::FILE_DESCRIPTOR_SET)
            .expect("the embedded descriptor set decodes");
        let admin_only = [
            "ConfigService/CreateVclTemplate",
            "ConfigService/UpdateVclTemplate",
            "ConfigService/DeleteVclTemplate",
            "ConfigService/RevertVclTemplate",
            "ConfigService/CreateVclTemplateBlock",
            "ConfigService/UpdateVclTemplateBlock",
            "ConfigService/DeleteVclTemplateBlock",
            "ConfigService/CreateVarnishServer",
            "ConfigService/UpdateVarnishServer",
            "ConfigService/DeleteVarnishServer",
            "TokenService/CreateToken",
            "TokenService/ListTokens",
            "TokenService/RevokeToken",
            "AgentService/Attach",
        ];
        let mut seen = 0;
        for file in &descriptors.file {
            for service in &file.service {
                for method in &service.method {
                    let short = format!("{}/{}", service.name(), method.name());
                    let path = format!("/{}.{short}", file.package());
                    let needed = required_role(&path).expect("every VaaS method needs a token");
                    let name = method.name();
                    let expected = if admin_only.contains(&short.as_str()) {
                        Role::Admin
                    } else if ["Get", "List", "Watch", "Diff", "WhoAmI", "Explain"]
                        .iter()
                        .any(|verb| name.starts_with(verb))
                    {
                        Role::Reader
                    } else {
                        Role::Editor
                    };
                    assert_eq!(needed, expected, "{path}");
                    seen += 1;
                }
            }
        }
        assert!(seen > 60, "only {seen} methods in the descriptor set");
        // Explaining a request reads the configuration and changes nothing.
        assert_eq!(
            required_role("/vaas.v1.StatusService/Explain"),
            Some(Role::Reader)
        );
    }

    #[test]
    fn roles_include_the_ones_below_them_but_agents_call_nothing() {
        assert!(allows(Role::Admin, Role::Editor));
        assert!(allows(Role::Editor, Role::Reader));
        assert!(!allows(Role::Reader, Role::Editor));
        assert!(!allows(Role::Editor, Role::Admin));
        assert!(!allows(Role::Agent, Role::Reader));
        assert!(!allows(Role::Unspecified, Role::Reader));
    }
}
