//! `krest worker demo|http`: the built-in workers (see ARCHITECTURE.md for why the CLI links
//! the worker runtime).

use krest_worker::nats::NatsConfig;

use super::args::{WorkerArgs, WorkerRunCmd};

fn worker_builder(nats: NatsConfig, app: &str, args: &WorkerArgs) -> krest_worker::WorkerBuilder {
    let mut builder = krest_worker::Worker::builder(app)
        .nats(nats)
        .weight(args.weight)
        .slots(args.slots)
        .ack_wait(args.ack_wait)
        .shutdown_timeout(args.shutdown_timeout)
        .version(env!("CARGO_PKG_VERSION"));
    if let Some(id) = &args.instance {
        builder = builder.instance(id);
    }
    builder
}

/// Runs `krest worker …` until SIGTERM or ctrl-c.
pub async fn run_worker(nats: NatsConfig, cmd: WorkerRunCmd) -> anyhow::Result<()> {
    let worker = match cmd {
        WorkerRunCmd::Demo(args) => {
            let opts = krest_demo_worker::DemoOptions {
                work: args.work,
                journal: args.journal,
            };
            krest_demo_worker::register(worker_builder(nats, &args.app, &args.worker), opts)
                .build()?
        }
        WorkerRunCmd::Http(args) => {
            krest_worker::http::register(worker_builder(nats, &args.app, &args.worker))?.build()?
        }
    };
    tracing::info!(instance = worker.instance(), "worker starting");
    worker.run(krest_worker::shutdown_signal()).await?;
    Ok(())
}
