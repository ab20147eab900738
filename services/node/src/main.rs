//! The `cairn` binary; everything lives in the library so that the test
//! harness can build the very same node.

fn main() -> std::process::ExitCode {
    cairn::cli_main()
}
