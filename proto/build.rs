//! Compiles `agent.proto` with protox (pure Rust, no `protoc`) and generates
//! prost messages plus the tonic server and/or client, depending on features.

fn main() {
    println!("cargo:rerun-if-changed=agent.proto");
    println!("cargo:rerun-if-changed=build.rs");

    let fds = match protox::compile(["agent.proto"], ["."]) {
        Ok(fds) => fds,
        Err(e) => panic!("agent.proto: {e:?}"),
    };

    let server = std::env::var_os("CARGO_FEATURE_SERVER").is_some();
    let client = std::env::var_os("CARGO_FEATURE_CLIENT").is_some();

    if let Err(e) = tonic_prost_build::configure()
        .build_server(server)
        .build_client(client)
        .build_transport(client)
        .emit_rerun_if_changed(false)
        .compile_fds(fds)
    {
        panic!("generating agent API code: {e}");
    }
}
