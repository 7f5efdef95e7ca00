//! The `wharf` binary: parses flags and hands off to the library.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
