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

/// The format version this build writes into new records.
pub const FORMAT_VERSION: u32 = 1;

/// The OpenAPI document of the REST API, served at `/v1/openapi.yaml`.
pub const OPENAPI_YAML: &str = include_str!("../openapi.yaml");
