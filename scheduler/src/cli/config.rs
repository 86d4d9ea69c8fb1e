//! Configuration: flags, then environment variables, then an optional TOML file (`--config
//! FILE` or `KREST_CONFIG`), then built-in defaults — the first that sets a value wins.
//!
//! The file's settings become the defaults of the command line's arguments before it is
//! parsed, so clap itself applies the order (a flag beats its environment variable, which
//! beats a default). Keys are the long flag names (`lease-ttl` or `lease_ttl`): the top level
//! holds the global ones (NATS URL, login, TLS, timeouts, log format), `[scheduler]` those of
//! `krest scheduler`, `[worker]` those of `krest worker demo|http`. An unknown key is an error
//! naming it. `krest scheduler --print-config` prints the effective configuration, each value
//! with where it came from, secrets redacted. `docs/config.md` is generated from the same
//! definitions ([`reference`]).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgMatches, Command, CommandFactory, FromArgMatches};

use super::args::Cli;

/// Settings whose values are secrets: never printed.
const SECRETS: [&str; 5] = ["password", "token", "nkey", "api-token", "api-read-token"];

/// Arguments that are not settings (actions, the config file itself, output of clients).
const NOT_SETTINGS: [&str; 5] = ["help", "version", "config", "print-config", "output"];

/// The TOML sections and the subcommands (paths from the root) their keys apply to.
const SECTIONS: [(&str, &[&[&str]]); 2] = [
    ("scheduler", &[&["scheduler"]]),
    ("worker", &[&["worker", "demo"], &["worker", "http"]]),
];

/// Why the configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("the config file {path} is not valid TOML: {message}")]
    Toml {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A key names no setting.
    #[error("the config file {path}: unknown setting `{key}` (known here: {known})")]
    Unknown {
        /// The file.
        path: PathBuf,
        /// The key, with its section.
        key: String,
        /// The settings of that section.
        known: String,
    },
    /// A value of a type no setting takes.
    #[error(
        "the config file {path}: `{key}` must be a string, number, boolean or array of strings"
    )]
    BadValue {
        /// The file.
        path: PathBuf,
        /// The key, with its section.
        key: String,
    },
}

/// The config file named by `--config FILE`, `--config=FILE` or `KREST_CONFIG`.
fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--" {
            break;
        }
        if s == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = s.strip_prefix("--config=") {
            return Some(PathBuf::from(v));
        }
    }
    std::env::var_os("KREST_CONFIG")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// A TOML value as a command-line value.
fn as_arg(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        toml::Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .map(|v| v.join(",")),
        _ => None,
    }
}

/// The settings (long names) a command takes.
fn settings(cmd: &Command) -> Vec<String> {
    cmd.get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| !NOT_SETTINGS.contains(l))
        .map(str::to_string)
        .collect()
}

/// `cmd` with `long`'s default set to `value` (in the subcommand at `path`).
fn set_default(cmd: Command, path: &[&str], long: &str, value: &'static str) -> Command {
    match path.split_first() {
        None => {
            let id = cmd
                .get_arguments()
                .find(|a| a.get_long() == Some(long))
                .map(|a| a.get_id().clone());
            match id {
                Some(id) => cmd.mut_arg(id, |a| a.default_value(value)),
                None => cmd,
            }
        }
        Some((sub, rest)) => cmd.mut_subcommand(*sub, |sc| set_default(sc, rest, long, value)),
    }
}

/// The subcommand at `path`.
fn find<'a>(cmd: &'a Command, path: &[&str]) -> Option<&'a Command> {
    match path.split_first() {
        None => Some(cmd),
        Some((sub, rest)) => find(cmd.find_subcommand(sub)?, rest),
    }
}

/// `cmd` with the settings of the TOML file at `path` as defaults; returns the keys set
/// (`section.key`, or `key` at the top).
fn apply_file(mut cmd: Command, path: &Path) -> Result<(Command, BTreeSet<String>), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Toml {
        path: path.to_path_buf(),
        message: e.message().to_string(),
    })?;
    let mut set = BTreeSet::new();
    let globals = settings(&cmd);
    for (key, value) in &table {
        if let Some((section, paths)) = SECTIONS.iter().find(|(s, _)| s == key) {
            let Some(inner) = value.as_table() else {
                return Err(ConfigError::BadValue {
                    path: path.to_path_buf(),
                    key: key.clone(),
                });
            };
            let known: BTreeSet<String> = paths
                .iter()
                .filter_map(|p| find(&cmd, p))
                .flat_map(settings)
                .collect();
            for (k, v) in inner {
                let long = k.replace('_', "-");
                let full = format!("{section}.{k}");
                if !known.contains(&long) {
                    return Err(ConfigError::Unknown {
                        path: path.to_path_buf(),
                        key: full,
                        known: known.iter().cloned().collect::<Vec<_>>().join(", "),
                    });
                }
                let value = as_arg(v).ok_or_else(|| ConfigError::BadValue {
                    path: path.to_path_buf(),
                    key: full.clone(),
                })?;
                // The defaults of a command line live as long as the process.
                let value: &'static str = Box::leak(value.into_boxed_str());
                for p in *paths {
                    cmd = set_default(cmd, p, &long, value);
                }
                set.insert(format!("{section}.{long}"));
            }
            continue;
        }
        let long = key.replace('_', "-");
        if !globals.contains(&long) {
            let mut known = globals.clone();
            known.extend(SECTIONS.iter().map(|(s, _)| format!("[{s}]")));
            return Err(ConfigError::Unknown {
                path: path.to_path_buf(),
                key: key.clone(),
                known: known.join(", "),
            });
        }
        let value = as_arg(value).ok_or_else(|| ConfigError::BadValue {
            path: path.to_path_buf(),
            key: key.clone(),
        })?;
        let value: &'static str = Box::leak(value.into_boxed_str());
        cmd = set_default(cmd, &[], &long, value);
        set.insert(long);
    }
    Ok((cmd, set))
}

/// Parses the command line of this process with its config file; prints the effective
/// configuration and exits for `--print-config`. Exits with clap's message on bad input.
pub fn parse() -> Cli {
    let args: Vec<OsString> = std::env::args_os().collect();
    match parse_from(args) {
        Ok(Parsed::Run(cli)) => *cli,
        Ok(Parsed::Printed(text)) => {
            print!("{text}");
            std::process::exit(0);
        }
        Err(ParseError::Clap(e)) => e.exit(),
        Err(ParseError::Config(e)) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}

/// What parsing a command line gave.
pub enum Parsed {
    /// A command to run.
    Run(Box<Cli>),
    /// `--print-config`: the text to print.
    Printed(String),
}

/// Why a command line could not be parsed.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The command line.
    #[error("{0}")]
    Clap(#[from] clap::Error),
    /// The config file.
    #[error("{0}")]
    Config(#[from] ConfigError),
}

/// [`parse`] for the given arguments (the first is the program name).
pub fn parse_from(args: Vec<OsString>) -> Result<Parsed, ParseError> {
    let mut cmd = Cli::command();
    let mut from_file = BTreeSet::new();
    let file = config_path(&args);
    if let Some(path) = &file {
        (cmd, from_file) = apply_file(cmd, path)?;
    }
    let matches = cmd.clone().try_get_matches_from(args)?;
    if let Some(("scheduler", sub)) = matches.subcommand() {
        if sub.get_flag("print_config") {
            return Ok(Parsed::Printed(effective(
                &cmd,
                &matches,
                sub,
                &from_file,
                file.as_deref(),
            )));
        }
    }
    Ok(Parsed::Run(Box::new(Cli::from_arg_matches(&matches)?)))
}

/// A value as printed: secrets redacted, URL passwords removed.
fn shown(long: &str, raw: &str) -> String {
    if SECRETS.contains(&long) {
        return krest_schemas::redact::REDACTED.to_string();
    }
    match long {
        "nats-url" => krest_schemas::redact::urls(raw),
        "db" => crate::record::store::redact_db_url(raw),
        _ => raw.to_string(),
    }
}

/// TOML lines of `cmd`'s settings as matched, each with its source.
fn settings_toml(
    out: &mut String,
    cmd: &Command,
    m: &ArgMatches,
    section: Option<&str>,
    from_file: &BTreeSet<String>,
) {
    use std::fmt::Write as _;
    for arg in cmd.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if NOT_SETTINGS.contains(&long) || (section.is_some() && arg.is_global_set()) {
            continue;
        }
        let id = arg.get_id().as_str();
        let key = section.map_or_else(|| long.to_string(), |s| format!("{s}.{long}"));
        let raw: Option<Vec<String>> = m
            .try_get_raw(id)
            .ok()
            .flatten()
            .map(|vals| vals.map(|v| v.to_string_lossy().into_owned()).collect());
        let source = match m.value_source(id) {
            Some(ValueSource::CommandLine) => "flag".to_string(),
            Some(ValueSource::EnvVariable) => format!(
                "environment {}",
                arg.get_env()
                    .map(|e| e.to_string_lossy())
                    .unwrap_or_default()
            ),
            Some(ValueSource::DefaultValue) if from_file.contains(&key) => "config file".into(),
            _ => "default".into(),
        };
        match raw {
            Some(vals) if !vals.is_empty() => {
                let value = shown(long, &vals.join(","));
                // A JSON string is a valid TOML basic string.
                let quoted = serde_json::to_string(&value).unwrap_or_default();
                let _ = writeln!(out, "{long} = {quoted}  # {source}");
            }
            _ => {
                let _ = writeln!(out, "# {long} (not set)");
            }
        }
    }
}

/// The effective configuration of `krest scheduler`, as TOML with sources in comments.
fn effective(
    cmd: &Command,
    root: &ArgMatches,
    scheduler: &ArgMatches,
    from_file: &BTreeSet<String>,
    file: Option<&Path>,
) -> String {
    let mut out = format!(
        "# Effective configuration of `krest scheduler` (flags, then environment, then {}, then defaults).\n# Secrets are shown as {}.\n",
        file.map_or_else(|| "no config file".to_string(), |f| format!("the config file {}", f.display())),
        krest_schemas::redact::REDACTED
    );
    settings_toml(&mut out, cmd, root, None, from_file);
    out.push_str("\n[scheduler]\n");
    if let Some(sc) = cmd.find_subcommand("scheduler") {
        settings_toml(&mut out, sc, scheduler, Some("scheduler"), from_file);
    }
    out
}

/// The settings reference (`docs/config.md`), generated from the command line's definition.
pub fn reference() -> String {
    let cmd = {
        let mut c = Cli::command();
        c.build();
        c
    };
    let mut out = String::from(
        "# Configuration\n\n\
         <!-- Generated from the command line's definition by `KREST_BLESS=1 cargo test -p krest --lib config_reference`; do not edit. -->\n\n\
         Every setting of `krest scheduler` and `krest worker demo|http` is read, in this order, from\n\
         its flag, its environment variable, the TOML file given by `--config FILE` (or\n\
         `KREST_CONFIG`), and finally its default: the first that sets it wins. In the file, keys\n\
         are the flag names (`lease-ttl` or `lease_ttl`); the global settings are at the top,\n\
         the others in `[scheduler]` and `[worker]`. An unknown key is an error naming it.\n\
         `krest scheduler --print-config` prints the effective configuration, each value with\n\
         where it came from, secrets redacted.\n\n\
         ```toml\n\
         nats-url = \"nats://nats-1:4222,nats://nats-2:4222\"\n\
         user = \"scheduler\"\n\
         log-format = \"json\"\n\n\
         [scheduler]\n\
         db = \"postgres://krest@db/krest\"\n\
         http = \"0.0.0.0:8722\"\n\
         replicas = 3\n\
         ```\n\n\
         Secrets (`password`, `token`, `nkey`, `api-token`, `api-read-token`) are better left to\n\
         the environment or a file only the service can read.\n",
    );
    let mut section = |title: &str, prefix: &str, cmd: &Command| {
        use std::fmt::Write as _;
        let _ = write!(
            out,
            "\n## {title}\n\n| Key | Flag | Environment | Default | Meaning |\n|---|---|---|---|---|\n"
        );
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if NOT_SETTINGS.contains(&long) || (!prefix.is_empty() && arg.is_global_set()) {
                continue;
            }
            let env = arg
                .get_env()
                .map(|e| format!("`{}`", e.to_string_lossy()))
                .unwrap_or_else(|| "-".into());
            let default = arg
                .get_default_values()
                .iter()
                .map(|v| format!("`{}`", v.to_string_lossy()))
                .collect::<Vec<_>>()
                .join(", ");
            let help = arg
                .get_help()
                .map(|h| h.to_string().replace('\n', " ").replace('|', "\\|"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "| `{prefix}{long}` | `--{long}` | {env} | {} | {help} |",
                if default.is_empty() {
                    "-".into()
                } else {
                    default
                }
            );
        }
    };
    section("Global (top level of the file)", "", &cmd);
    if let Some(sc) = cmd.find_subcommand("scheduler") {
        section("`krest scheduler` (`[scheduler]`)", "scheduler.", sc);
    }
    if let Some(sc) = find(&cmd, &["worker", "demo"]) {
        section(
            "`krest worker demo` and `krest worker http` (`[worker]`)",
            "worker.",
            sc,
        );
    }
    if let Some(sc) = find(&cmd, &["worker", "http"]) {
        let mut extra = String::new();
        for arg in sc.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if arg.is_global_set()
                || NOT_SETTINGS.contains(&long)
                || find(&cmd, &["worker", "demo"])
                    .is_some_and(|d| d.get_arguments().any(|a| a.get_long() == Some(long)))
            {
                continue;
            }
            extra.push_str(&format!("`worker.{long}`, "));
        }
        if !extra.is_empty() {
            out.push_str(&format!(
                "\n`krest worker http` also takes {} (see `krest worker http --help`).\n",
                extra.trim_end_matches(", ")
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::args::Command as Cmd;

    fn parse(args: &[&str]) -> Result<Parsed, ParseError> {
        parse_from(args.iter().map(OsString::from).collect())
    }

    fn write(content: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("krest.toml");
        std::fs::write(&path, content).unwrap();
        (dir, path.display().to_string())
    }

    #[test]
    fn flags_beat_the_file_which_beats_defaults() {
        let (_d, path) = write(
            "nats-url = \"nats://from-file:4222\"\ntimeout = \"9s\"\n[scheduler]\ndb = \"sqlite:///tmp/file.db\"\nlease_ttl = \"7s\"\nreplicas = 3\napi-anonymous-read = true\n[worker]\nweight = 5\n",
        );
        let Ok(Parsed::Run(cli)) =
            parse(&["krest", "--config", &path, "scheduler", "--lease-ttl", "4s"])
        else {
            panic!("parse failed")
        };
        assert_eq!(cli.nats_url, "nats://from-file:4222");
        assert_eq!(cli.timeout, std::time::Duration::from_secs(9));
        let Cmd::Scheduler(s) = cli.command else {
            panic!()
        };
        assert_eq!(s.db, "sqlite:///tmp/file.db");
        assert_eq!(
            s.lease_ttl,
            std::time::Duration::from_secs(4),
            "the flag wins"
        );
        assert_eq!(s.replicas, Some(3));
        assert!(s.api.api_anonymous_read);
        let Ok(Parsed::Run(cli)) = parse(&["krest", "--config", &path, "worker", "demo"]) else {
            panic!("parse failed")
        };
        let Cmd::Worker(crate::cli::args::WorkerRunCmd::Demo(w)) = cli.command else {
            panic!()
        };
        assert_eq!(w.worker.weight, 5);
    }

    #[test]
    fn unknown_keys_and_bad_files_are_named() {
        let (_d, path) = write("[scheduler]\nlease-tll = \"3s\"\n");
        let Err(e) = parse(&["krest", "--config", &path, "scheduler"]) else {
            panic!("accepted")
        };
        let e = e.to_string();
        assert!(e.contains("unknown setting `scheduler.lease-tll`"), "{e}");
        assert!(e.contains("lease-ttl"), "{e}");
        let (_d, path) = write("nats-url = [1, 2]\n");
        let e = parse(&["krest", "--config", &path, "job", "list"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("`nats-url` must be a string"), "{e}");
        let (_d, path) = write("nats-url = \n");
        let e = parse(&["krest", "--config", &path, "job", "list"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("is not valid TOML"), "{e}");
        let e = parse(&[
            "krest",
            "--config",
            "/nonexistent/krest.toml",
            "job",
            "list",
        ])
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("cannot read the config file /nonexistent/krest.toml"),
            "{e}"
        );
    }

    #[test]
    fn print_config_shows_sources_and_hides_secrets() {
        let (_d, path) = write(
            "password = \"s3cret\"\n[scheduler]\ndb = \"postgres://krest:dbpass@db/krest\"\napi-token = \"tok\"\n",
        );
        let Ok(Parsed::Printed(text)) = parse(&[
            "krest",
            "--config",
            &path,
            "--user",
            "sched",
            "scheduler",
            "--print-config",
        ]) else {
            panic!("not printed")
        };
        assert!(text.contains("user = \"sched\"  # flag"), "{text}");
        assert!(
            text.contains("password = \"<redacted>\"  # config file"),
            "{text}"
        );
        assert!(text.contains("timeout = \"5s\"  # default"), "{text}");
        assert!(text.contains("\n[scheduler]\n"), "{text}");
        assert!(
            text.contains("api-token = \"<redacted>\"  # config file"),
            "{text}"
        );
        assert!(
            text.contains("db = \"postgres://<redacted>@db/krest\"  # config file"),
            "{text}"
        );
        assert!(!text.contains("s3cret") && !text.contains("dbpass") && !text.contains("\"tok\""));
        // The printed text is a config file.
        let body: String = text
            .lines()
            .map(|l| l.split("  #").next().unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        toml::from_str::<toml::Table>(&body).unwrap();
    }

    #[test]
    fn config_reference() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/config.md");
        let text = reference();
        if std::env::var_os("KREST_BLESS").is_some() {
            std::fs::write(&path, &text).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == text,
            "docs/config.md is stale: run KREST_BLESS=1 cargo test -p krest --lib config_reference"
        );
    }
}
