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
