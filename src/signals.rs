//! Graceful shutdown: long-running commands finish their batch, checkpoint and exit on
//! SIGINT or SIGTERM, within a time limit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, Signal, SignalKind};

/// How long a stop may take.
#[derive(clap::Args)]
pub struct ShutdownArgs {
    /// Seconds a stop (SIGINT or SIGTERM) may take to finish the batch in hand, save the
    /// last checkpoints and write the sinks a last time. Past them, or at a second
    /// signal, the process exits at once with status 1: nothing is lost or counted
    /// twice, a restart reads on from the last checkpoint saved. With the broker and
    /// DynamoDB both unreachable the orderly part could otherwise take minutes. Keep it
    /// under the orchestrator's grace period (ECS stopTimeout, Kubernetes
    /// terminationGracePeriodSeconds), which kills harder. 0: no limit.
    #[arg(long, global = true, value_name = "SECS", default_value_t = 60.0, value_parser = crate::args::seconds, env = "TOOLRANK_SHUTDOWN_SECS")]
    shutdown_secs: f64,
}

impl ShutdownArgs {
    /// A flag set at the first SIGINT or SIGTERM; the stop is bounded (see the flag).
    pub fn watch(&self) -> Arc<AtomicBool> {
        let stop = Arc::new(AtomicBool::new(false));
        let limit = (self.shutdown_secs > 0.0).then(|| Duration::from_secs_f64(self.shutdown_secs));
        watch_signals(stop.clone(), limit);
        stop
    }
}

/// The next SIGINT or SIGTERM.
async fn signalled(int: &mut Signal, term: &mut Signal) {
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}

/// Sets `stop` on SIGINT or SIGTERM; then ends the process once `limit` passes or at a
/// second signal.
fn watch_signals(stop: Arc<AtomicBool>, limit: Option<Duration>) {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
        rt.block_on(async {
            let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            signalled(&mut int, &mut term).await;
            stop.store(true, Ordering::Relaxed);
            let secs = limit.map(|l| l.as_secs_f64());
            tracing::info!(limit_secs = secs, "stop requested: finishing the batch, the last checkpoints and the sinks' write (a second signal exits at once)");
            let expired = async {
                match limit {
                    Some(limit) => tokio::time::sleep(limit).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = signalled(&mut int, &mut term) => tracing::warn!("a second signal: exiting now; a restart reads on from the last checkpoint"),
                _ = expired => tracing::error!(limit_secs = secs, "the stop took longer than --shutdown-secs: exiting now; a restart reads on from the last checkpoint"),
            }
        });
        std::process::exit(1);
    });
}
