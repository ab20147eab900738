fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/cairn/metadata/v1/metadata.proto",
        "proto/cairn/rpc/v1/rpc.proto",
        "proto/cairn/data/v1/data.proto",
        "proto/cairn/iscsi/v1/iscsi.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_build::configure()
        .build_server(true)
        .build_client(true)
        // Holds CHAP secrets: cairn-api implements a redacting `Debug` so that
        // no `{:?}` of a record or command can put a secret into a log.
        .skip_debug(".cairn.metadata.v1.IscsiTargetRecord")
        // A primary sends one buffer to every replica: shared, not copied.
        .bytes([
            ".cairn.data.v1.ReplicaWrite.data",
            ".cairn.data.v1.VdiskIo.data",
        ])
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}
