//! wharf: a self-hosted container registry and deploy pipeline in one binary.
//!
//! Layers, inward: `registry` (HTTP) → `store` → (`store::blob`, `store::meta`) → `oci`.
//! `cli` sits on top and nothing depends on it.

pub mod auth;
pub mod config;
pub mod oci;
pub mod registry;
pub mod server;
pub mod store;
pub mod time;
