//! wharf: a self-hosted container registry and deploy pipeline in one binary.
//!
//! Layers, inward: `registry` (HTTP) → `store` → (`store::blob`, `store::meta`) → `oci`.
//! `client` (a registry client) and `ci` (tags from git, promotion) talk to a registry over
//! HTTP. `cli` sits on top and nothing depends on it.

pub mod agent;
pub mod auth;
pub mod ci;
pub mod client;
pub mod config;
pub mod errorbody;
pub mod events;
pub mod idle;
pub mod oci;
pub mod registry;
pub mod sendfile;
pub mod server;
pub mod store;
pub mod time;
