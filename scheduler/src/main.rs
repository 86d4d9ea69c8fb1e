//! The `krest` binary: `krest scheduler` runs a node; every other command is a client.

use std::process::ExitCode;

use krest::cli::{self, Cli, Command};
use krest::infra::InfraConfig;
use krest::leader::engine::EngineConfig;
use krest::node::{self, NodeOptions};
use tokio_util::sync::CancellationToken;

/// mimalloc rather than glibc's malloc: a busy node spent ~20 % of its CPU in glibc's
/// `malloc`/`free` (fastbin consolidation among them); see BENCHMARKS.md, "CPU per run".
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = cli::config::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            let broken_pipe = e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            });
            if broken_pipe {
                return ExitCode::SUCCESS;
            }
            cli::report(&e);
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Scheduler(args) => {
            init_logging(cli.log_format);
            let mut opts = NodeOptions::new(
                cli.nats_url.clone(),
                args.db,
                args.node.unwrap_or_else(node::default_node_name),
            );
            opts.nats = cli.nats.config(&cli.nats_url);
            opts.lease_renew = args.lease_renew;
            opts.http_addr = args.http.0;
            opts.web = krest::serve::web::WebOptions {
                api_token: args.api.api_token,
                read_token: args.api.api_read_token,
                anonymous_read: args.api.api_anonymous_read,
            };
            opts.infra = InfraConfig {
                replicas: args.replicas,
                lease_ttl: args.lease_ttl,
                ..InfraConfig::default()
            };
            opts.recorder.max_lag = args.recorder_max_lag;
            opts.retention.keep_for = args
                .keep_days
                .map(|d| std::time::Duration::from_secs(u64::from(d) * 86_400));
            opts.retention.keep_runs = args.keep_runs;
            opts.engine = EngineConfig {
                misfire_threshold: args.misfire_threshold,
                dispatch_ahead: args.dispatch_ahead,
                ..EngineConfig::default()
            };
            if opts.lease_renew * 2 > opts.infra.lease_ttl {
                anyhow::bail!(
                    "--lease-renew ({:?}) must be at most half of --lease-ttl ({:?})",
                    opts.lease_renew,
                    opts.infra.lease_ttl
                );
            }
            let stop = CancellationToken::new();
            let signals = stop.clone();
            tokio::spawn(async move {
                krest_worker::shutdown_signal().await;
                signals.cancel();
            });
            node::run(opts, stop, None).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Completion { shell } => {
            use clap::CommandFactory;
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "krest", &mut script);
            std::io::Write::write_all(&mut std::io::stdout(), &script)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Health(args) => cli::health(&args, cli.timeout).await,
        Command::Man => {
            std::io::Write::write_all(&mut std::io::stdout(), &cli::man_page()?)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Worker(cmd) => {
            init_logging(cli.log_format);
            cli::run_worker(cli.nats.config(&cli.nats_url), cmd).await?;
            Ok(ExitCode::SUCCESS)
        }
        _ => cli::run_client(cli).await,
    }
}

fn init_logging(format: krest_worker::logging::LogFormat) {
    krest_worker::logging::init(format, "info,async_nats=warn,sqlx=warn");
}
