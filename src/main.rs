//! The `keywarden` binary: parse arguments, load settings, run.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use keywarden::{
    cli::{Cli, Command, client},
    config::Settings,
    startup::Application,
    store::Store,
    telemetry,
};

// Verify allocates on request threads and frees on the audit writer's;
// mimalloc handles that cross-thread traffic far better than glibc malloc
// (docs/decisions.md has the profile).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keywarden: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keywarden: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve { config } => {
            let settings = Settings::load(config.as_deref())?;
            let telemetry = telemetry::init(settings.log_format).map_err(|e| anyhow::anyhow!(e))?;
            let app = Application::build(settings).await?;
            let stop = keywarden::startup::shutdown_signal().context("installing the SIGTERM handler")?;
            tracing::info!(
                listen = %app.local_addr(),
                admin_listen = app.admin_addr().map(tracing::field::display),
                health_listen = app.health_addr().map(tracing::field::display),
                tls = app.serves_tls(),
                metrics = app.metrics_addr().map(tracing::field::display),
                version = env!("CARGO_PKG_VERSION"),
                exporting_spans = telemetry.exporting(),
                "keywarden serving"
            );
            let result = app.run_until_stopped(stop).await;
            telemetry.shutdown();
            result
        }
        Command::Migrate { config } => {
            let settings = Settings::load(config.as_deref())?;
            let telemetry = telemetry::init(settings.log_format).map_err(|e| anyhow::anyhow!(e))?;
            let migrated = async {
                keywarden::startup::secure_embedded_data_dir(&settings)?;
                let store = Store::connect(&settings.database_url(), &Default::default())
                    .await
                    .context("connecting to the database")?;
                store.migrate().await.context("applying migrations")?;
                store.close().await;
                anyhow::Ok(())
            }
            .await;
            telemetry.shutdown();
            migrated?;
            eprintln!("keywarden: migrations applied");
            Ok(())
        }
        Command::Keys { conn, command } => client::keys(conn, command).await,
        Command::Operators { conn, command } => client::operators(conn, command).await,
        Command::Peppers { conn, command } => client::peppers(conn, command).await,
        Command::Audit { conn, command } => client::audit(conn, command).await,
        Command::Verify { conn, api_key, ip, scope, endpoint, method, cost } => {
            client::verify(conn, api_key, ip, scope, endpoint, method, cost).await
        }
    }
}
