//! Integration tests: the registry over real HTTP on 127.0.0.1, and real clients.

mod common;
/// The PostgreSQL cluster of the library's own tests.
#[path = "../../src/store/meta/postgres/testdb.rs"]
mod testdb;
/// The Garage node of the library's own tests.
#[path = "../../src/store/blob/testgarage.rs"]
mod testgarage;

mod agent;
mod api;
mod auth;
mod auth_clients;
mod blobs;
mod buildx_cache;
mod cluster;
mod crash;
mod docker_cli;
mod docs;
mod examples;
mod gc;
mod health;
mod hostile;
mod import;
mod listings;
mod manifests;
mod memory;
mod migrate;
mod podman;
mod policy;
mod postgres;
mod promote;
mod quota;
mod referrers;
mod restart;
mod retention;
mod s3;
mod security;
mod skopeo;
mod tags_cli;
mod tls;
mod uploads;
mod webhooks;
