//! The `flagsmith-sse` binary: read settings, start logging, serve until a signal; or, with
//! `healthcheck`, ask the service those settings describe whether it is ready.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use flagsmith_sse::config::{Config, LogFormat};
use flagsmith_sse::server::Server;

fn main() -> ExitCode {
    let config = Config::parse();
    if config.command == "healthcheck" {
        return healthcheck(&config);
    }
    // Colours only for a person at a terminal: journald, `docker logs` and files get plain
    // text that grep and log pipelines read.
    let logs = tracing_subscriber::fmt()
        .with_max_level(config.log_level)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    match flagsmith_sse::limits::raise_open_file_limit() {
        Ok((before, soft, hard)) => {
            tracing::info!(soft_before = before, soft, hard, "open-file limit");
        }
        Err(err) => tracing::warn!(error = %err, "could not read or raise the open-file limit"),
    }
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("flagsmith-sse: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// One line either way: Docker keeps the output of the last checks (`docker inspect`).
/// Exit 1 for unhealthy, as Docker's HEALTHCHECK expects (2 is reserved).
fn healthcheck(config: &Config) -> ExitCode {
    use flagsmith_sse::healthcheck::{Probe, TIMEOUT};
    match Probe::from_config(config).and_then(|probe| Ok((probe.run(TIMEOUT)?, probe))) {
        Ok((status, probe)) => {
            println!("GET {} on {} answered {status}", probe.path, probe.addr);
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("flagsmith-sse healthcheck: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let served = runtime.block_on(async {
        let server = Server::bind(&config).await?;
        // Tests and scripts read this line to learn the port when LISTEN_ADDR has port 0.
        // One write, so that no reader ever sees half of the address.
        let line = format!("flagsmith-sse listening on {}\n", server.local_addr()?);
        let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
        server.serve(shutdown_signal()).await;
        anyhow::Ok(())
    });
    // Tasks still holding stuck clients are dropped, not awaited: the deadline was served.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    served
}

/// SIGTERM (Kubernetes, systemd, docker stop) or Ctrl-C.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
