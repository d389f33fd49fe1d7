//! The `lichen` binary: `lichen run` is the daemon; the other verbs talk to it. With feature
//! `operator`, `lichen hub ...` is the operator's tool (`lichen-operator`); with feature
//! `bench`, `lichen bench` measures the node (`lichen-bench`). Both are on by default;
//! `--no-default-features --features small-node` builds the small node (README: "Two node
//! flavours").

mod client;

use std::process::ExitCode;

use clap::Parser;
use client::{Cli, Command, print_doctor, report_error, run_client};
use tracing::Level;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // LICHEN_LOG is one level (trace, debug, info, warn, error); a plain level filter keeps
    // the regex engine of an env-filter out of the binary.
    let level = std::env::var("LICHEN_LOG")
        .ok()
        .and_then(|v| v.parse::<Level>().ok())
        .unwrap_or(Level::INFO);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(lichen_agent::util::stderr_colours())
        .init();
    // The daemon's threads come from its config (`[threads]`); other verbs use the defaults.
    let threads = match &cli.command {
        Command::Run(args) => {
            match lichen_agent::config::AgentConfig::load(args.config.as_deref()) {
                Ok(config) => config.threads,
                Err(err) => return report_error(&err),
            }
        }
        _ => lichen_agent::config::ThreadsSection::default(),
    };
    let runtime = match threads.runtime() {
        Ok(rt) => rt,
        Err(err) => return report_error(&err.context("cannot start the async runtime")),
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => match lichen_agent::daemon::run(args, &cli.socket).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => report_error(&err),
            },
            #[cfg(feature = "bench")]
            Command::Bench(args) => match lichen_bench::run(args, cli.json).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => report_error(&err),
            },
            Command::Doctor(args) => {
                let config = match lichen_agent::config::AgentConfig::load(args.config.as_deref()) {
                    Ok(config) => config,
                    Err(err) => return report_error(&err),
                };
                let engine = match config.engine_options() {
                    Ok(engine) => engine,
                    Err(err) => return report_error(&err),
                };
                let mut report = lichen_agent::doctor::report(&config.board, Some(&engine));
                #[cfg(feature = "pods")]
                report
                    .checks
                    .push(lichen_agent::pods::server::probe(&config.containerd));
                if args.config.is_some() {
                    report
                        .checks
                        .push(lichen_agent::hub::hub_check(config.hub.as_ref()));
                }
                report
                    .checks
                    .extend(lichen_agent::update::doctor_checks(&config));
                print_doctor(&report, cli.json);
                ExitCode::SUCCESS
            }
            #[cfg(feature = "operator")]
            Command::Hub { command } => match lichen_operator::run(command, cli.json).await {
                Ok(code) => code,
                Err(err) => report_error(&err),
            },
            Command::Update(args) => {
                tokio::task::block_in_place(|| lichen_agent::update::run(args, cli.json))
            }
            other => run_client(other, &cli.socket, cli.json).await,
        }
    })
}
