//! One file per configuration resource: its [`Resource`](crate::Resource) implementation, the
//! only place that knows its table, columns, checks and affected clusters.

mod backend;
mod cluster;
mod dc;
mod director;
mod domain_mapping;
mod probe;
mod redirect;
mod route;
mod time_profile;
mod varnish_server;
mod vcl_template;
mod vcl_template_block;
mod vcl_variable;
pub(crate) use route::ROUTES_OF_CLUSTER;
