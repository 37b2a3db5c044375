//! Compiles `proto/*.proto` with protox (a protobuf compiler in Rust), so that building hop
//! needs no system `protoc`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(["proto/hop.proto"], ["proto"])?;
    prost_build::Config::new()
        .bytes(["."])
        // A Deliver's fields that only some copies carry (a sent copy's recipient, a group
        // copy's group and event) are boxed: inline they would grow every Deliver, and so
        // every stanza and router action on the message path, by 96 bytes.
        .boxed(".hop.v2.Deliver.to")
        .boxed(".hop.v2.Deliver.group")
        .boxed(".hop.v2.Deliver.event")
        .compile_fds(descriptors)?;
    compile_node_mail()?;
    Ok(())
}

/// `node.proto` (package `hop.node`) names `hop.v2` types, which must be `wire`'s own, not a
/// second copy. The compile is given both files (prost-build needs every message it derives
/// traits through), `hop.v2` is mapped to `crate::wire`, and only `hop.node.rs` is written:
/// writing `hop.v2.rs` from here would replace the one above, made with its boxed fields.
fn compile_node_mail() -> Result<(), Box<dyn std::error::Error>> {
    let descriptors = protox::compile(["proto/node.proto"], ["proto"])?;
    let requests = descriptors
        .file
        .into_iter()
        .map(|file| {
            (
                prost_build::Module::from_protobuf_package_name(file.package()),
                file,
            )
        })
        .collect();
    let node = prost_build::Module::from_protobuf_package_name("hop.node");
    let mut modules = prost_build::Config::new()
        .bytes(["."])
        .extern_path(".hop.v2", "crate::wire")
        .generate(requests)?;
    let code = modules
        .remove(&node)
        .ok_or("proto/node.proto generated no hop.node module")?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let path = out_dir.join(node.to_file_name_or("hop.node"));
    // Written only when it changed, so that the crate is not rebuilt for nothing.
    if std::fs::read_to_string(&path).ok().as_deref() != Some(code.as_str()) {
        std::fs::write(&path, code)?;
    }
    Ok(())
}
