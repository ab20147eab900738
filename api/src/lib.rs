//! The language every Cairn part speaks: versioned protobuf records and RPCs
//! (generated from `api/proto`), the OpenAPI contract (`api/openapi.yaml`),
//! and [`record::Record`], which keeps fields written by newer versions intact
//! across a read-modify-write so that mixed-version clusters lose nothing.

pub mod record;

/// Metadata records and the replicated command log (`cairn.metadata.v1`).
pub mod metadata {
    /// Version 1 of the metadata records.
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("cairn.metadata.v1");
    }
}

/// `Debug` without the CHAP secrets (generated `Debug` is skipped for this
/// record in `build.rs`): commands and records are logged with `{:?}`.
impl std::fmt::Debug for metadata::v1::IscsiTargetRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |s: &str| if s.is_empty() { "" } else { "<redacted>" };
        f.debug_struct("IscsiTargetRecord")
            .field("format_version", &self.format_version)
            .field("iqn", &self.iqn)
            .field("luns", &self.luns)
            .field("chap_user", &self.chap_user)
            .field("chap_secret", &redacted(&self.chap_secret))
            .field("mutual_user", &self.mutual_user)
            .field("mutual_secret", &redacted(&self.mutual_secret))
            .field("allowed_initiators", &self.allowed_initiators)
            .field("created_unix_ms", &self.created_unix_ms)
            .finish()
    }
}

/// Node-to-node RPCs (`cairn.rpc.v1`).
pub mod rpc {
    /// Version 1 of the node-to-node RPCs.
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("cairn.rpc.v1");
    }
}

/// Extent group files and the data service's RPCs (`cairn.data.v1`).
pub mod data {
    /// Version 1 of the extent format and data RPCs.
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("cairn.data.v1");
    }
}

/// The iSCSI front end's messages between nodes (`cairn.iscsi.v1`).
pub mod iscsi {
    /// Version 1 of the iSCSI messages.
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("cairn.iscsi.v1");
    }
}

/// The format version this build writes into new records.
pub const FORMAT_VERSION: u32 = 1;

/// The OpenAPI document of the REST API, served at `/v1/openapi.yaml`.
pub const OPENAPI_YAML: &str = include_str!("../openapi.yaml");

#[cfg(test)]
mod tests {
    use super::metadata::v1::{command::Op, Command, CreateIscsiTarget, IscsiTargetRecord};

    #[test]
    fn debug_of_an_iscsi_target_hides_its_secrets() {
        let cmd = Command {
            op: Some(Op::CreateIscsiTarget(CreateIscsiTarget {
                target: Some(IscsiTargetRecord {
                    iqn: "iqn.2026-11.io.cairn:t".into(),
                    chap_user: "u".into(),
                    chap_secret: "s3cret-one-way".into(),
                    mutual_user: "t".into(),
                    mutual_secret: "s3cret-mutual!".into(),
                    ..Default::default()
                }),
            })),
            ..Default::default()
        };
        let text = format!("{cmd:?} {cmd:#?}");
        assert!(text.contains("iqn.2026-11.io.cairn:t"));
        assert!(!text.contains("s3cret"), "{text}");
    }
}
