//! The `wharf` binary: parses flags and hands off to the library.

mod cli;

/// jemalloc, with a background thread that returns memory freed by a burst (thousands of
/// connections) to the system after a second; glibc's malloc kept it. Its settings are
/// given at build time, in `.cargo/config.toml`.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
