//! Compiles `proto/*.proto` with protox (a protobuf compiler in Rust), so that building hop
//! needs no system `protoc`.

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
    Ok(())
}
