//! A ready `tracing` setup for worker binaries (feature `logging`; the `krest` binary uses it
//! too): log lines on stderr, as text — coloured only on a terminal — or as JSON objects, one
//! per line, for log collectors. Lines logged while a run executes carry its `run`, `job`,
//! `shard` and `attempt` (the SDK runs each attempt in a span with them).

use std::io::IsTerminal as _;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable text.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `fields`, `spans`).
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("unknown log format `{s}`: use text or json")),
        }
    }
}

/// Installs the global subscriber: the filter from `KREST_LOG` (else `RUST_LOG`, else
/// `default_filter`), lines on stderr in `format`. Does nothing if one is installed already.
pub fn init(format: LogFormat, default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("KREST_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(false)
            .with_span_list(true)
            .try_init(),
    };
}
