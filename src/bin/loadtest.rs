//! TEMPORARY stand-in for `udpring load` until the main binary wires it up.
//! Drop this file when merging branch `load`.

use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "loadtest", about = "Stand-in for `udpring load`")]
struct Cli {
    /// `load` subcommand, accepted so the command line matches `udpring load ...`.
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    /// UDP request/response load generator.
    Load(udpring::load::LoadArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let Cmd::Load(args) = cli.cmd;
    match udpring::load::run_cli(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadtest: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
