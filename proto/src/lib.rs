//! The VaaS gRPC contracts: messages, clients and servers generated from `proto/vaas/v1`.
//!
//! This crate only holds generated code and the encoded file descriptor set (for gRPC reflection);
//! conversions and validation live in the crates that use the messages.

/// Package `vaas.v1`: configuration, tasks and the agent protocol.
pub mod v1 {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("vaas.v1");
}

/// The encoded `FileDescriptorSet` of every VaaS proto file, for gRPC reflection services.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("vaas_descriptor");

/// The largest message a VaaS peer accepts on the agent stream (a cluster snapshot: 10,000
/// backends with tags take a few MiB). gRPC's usual 4 MiB would fail every reload of a large
/// cluster.
pub const MAX_AGENT_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// The largest request the API accepts: above the largest template (1 MiB) and a bulk call of
/// 10,000 backends, far below what would strain the server.
pub const MAX_API_REQUEST_BYTES: usize = 16 * 1024 * 1024;
