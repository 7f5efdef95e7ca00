//! OCI types: digests, names, references, manifests. No I/O here.

pub mod digest;
pub mod keyset;
pub mod manifest;
pub mod name;

pub use digest::{Algorithm, Digest, DigestError, Hasher};
pub use name::{Reference, RepoName};
