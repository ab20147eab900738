//! The `cairn` binary, built inside the test package (see Cargo.toml).

fn main() -> std::process::ExitCode {
    cairn::cli_main()
}
