//! Compiles proto/vaas/v1 with protox (no protoc needed) and generates tonic clients and servers.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "vaas/v1/dc.proto",
        "vaas/v1/cluster.proto",
        "vaas/v1/vcl_template.proto",
        "vaas/v1/varnish_server.proto",
        "vaas/v1/director.proto",
        "vaas/v1/backend.proto",
        "vaas/v1/probe.proto",
        "vaas/v1/audit.proto",
        "vaas/v1/vcl_variable.proto",
        "vaas/v1/vcl_template_block.proto",
        "vaas/v1/time_profile.proto",
        "vaas/v1/route.proto",
        "vaas/v1/domain_mapping.proto",
        "vaas/v1/redirect.proto",
        "vaas/v1/reload_progress.proto",
        "vaas/v1/task.proto",
        "vaas/v1/status_service.proto",
        "vaas/v1/token_service.proto",
        "vaas/v1/config_service.proto",
        "vaas/v1/agent_service.proto",
    ];
    println!("cargo:rerun-if-changed=vaas");
    let descriptors = protox::compile(files, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("vaas_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
