//! The daemon's log: one sink (stderr, text or JSON lines: what journald or a container runtime
//! collects), filtered by a level and per-component debug flags that the control methods change
//! while it runs (`rpc_log`, SPDK's `log_set_level` and `log_set_flag`).
//!
//! Invariants:
//! - the filter in force is always [`LogState::directives`]: the level, then `RUST_LOG`'s
//!   directives that name a target (as given at start-up), then `TARGET=debug` for each flag
//!   set; a component's flag shows its debug messages whatever the level;
//! - a change takes effect for every thread at once (the reload layer rebuilds each callsite's
//!   interest), and callsites the filter disables cost the data path what they did before: a
//!   cached "never";
//! - nothing here logs a message's fields: secrets stay out of logs at every level because the
//!   code that logs never names them (tests/e2e/nvmf_auth.py checks at debug).

use std::fmt;

use parking_lot::Mutex;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// SPDK's level names, most severe first, with what each shows of ours (SPDK's NOTICE, between
/// WARNING and INFO, has no level of its own here: it shows what INFO shows), then two of
/// ours.
pub const LEVELS: &[(&str, &str)] = &[
    ("ERROR", "error"),
    ("WARNING", "warn"),
    ("NOTICE", "info"),
    ("INFO", "info"),
    ("DEBUG", "debug"),
    // Ballast's beyond SPDK's five: what `RUST_LOG=trace` or `off` asked.
    ("TRACE", "trace"),
    ("OFF", "off"),
];

/// Components whose debug messages a flag shows: SPDK-style flag name → our targets.
pub const FLAGS: &[(&str, &[&str])] = &[
    ("nvmf", &["ballast_nvmf"]),
    ("nvmf_auth", &["ballast_nvmf::auth"]),
    ("nvmf_tcp", &["ballast_nvmf::queue", "ballast_nvmf::pdu"]),
    ("nbd", &["ballast_nbd"]),
    ("tls", &["ballast_tls", "ballast_nvmf::tls", "ballast::nbd_tls"]),
    ("reactor", &["ballast_engine"]),
    ("lvol", &["ballast_volume", "ballast_engine::volume"]),
    ("rpc", &["ballast::rpc"]),
    // The control plane: the `ballast` crate's modules (a target of `ballast` alone would
    // also match the `ballast_*` crates, as targets match by prefix).
    ("ballast", &["ballast::"]),
];

/// A level or flag name this daemon does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    #[error("invalid log level {0:?} (ERROR, WARNING, NOTICE, INFO, DEBUG, TRACE or OFF)")]
    Level(String),
    #[error("unknown log flag {0:?} (log_get_flags lists them)")]
    Flag(String),
    #[error("the log filter could not be changed: {0}")]
    Reload(String),
}

/// The level and flags in force, and what `RUST_LOG` added at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogState {
    /// An entry of [`LEVELS`] (its SPDK name is what `log_get_level` answers).
    level: usize,
    /// `RUST_LOG`'s directives that name a target.
    extra: Vec<String>,
    /// Set flags, by index in [`FLAGS`].
    flags: Vec<bool>,
}

impl LogState {
    /// The state `RUST_LOG` (or its absence) asks for: its bare level (INFO when it has none
    /// or one SPDK has no name for, as `trace`), its directives for targets.
    pub fn from_env(rust_log: Option<&str>) -> Self {
        let mut level = index_of("INFO").expect("INFO is a level");
        let mut extra = Vec::new();
        for d in rust_log.unwrap_or("").split(',').map(str::trim).filter(|d| !d.is_empty()) {
            // The last of ours is the level (NOTICE's `info` is INFO's); the rest, targets.
            match LEVELS.iter().rposition(|(_, ours)| d.eq_ignore_ascii_case(ours)) {
                Some(i) => level = i,
                None => extra.push(d.to_string()),
            }
        }
        LogState { level, extra, flags: vec![false; FLAGS.len()] }
    }

    /// The level's SPDK name.
    pub fn level(&self) -> &'static str {
        LEVELS[self.level].0
    }

    pub fn set_level(&mut self, name: &str) -> Result<(), LogError> {
        self.level = index_of(name).ok_or_else(|| LogError::Level(name.to_string()))?;
        Ok(())
    }

    /// Sets (`on`) or clears flag `name`.
    pub fn set_flag(&mut self, name: &str, on: bool) -> Result<(), LogError> {
        let i = FLAGS
            .iter()
            .position(|(f, _)| f.eq_ignore_ascii_case(name))
            .ok_or_else(|| LogError::Flag(name.to_string()))?;
        self.flags[i] = on;
        Ok(())
    }

    /// Every flag with whether it is set, in [`FLAGS`]' order.
    pub fn flags(&self) -> impl Iterator<Item = (&'static str, bool)> + '_ {
        FLAGS.iter().zip(&self.flags).map(|((name, _), &on)| (*name, on))
    }

    /// The filter's directives (`EnvFilter` syntax).
    pub fn directives(&self) -> String {
        let mut d = vec![LEVELS[self.level].1.to_string()];
        d.extend(self.extra.iter().cloned());
        for ((_, targets), _) in FLAGS.iter().zip(&self.flags).filter(|(_, &on)| on) {
            d.extend(targets.iter().map(|t| format!("{t}=debug")));
        }
        d.join(",")
    }
}

fn index_of(name: &str) -> Option<usize> {
    LEVELS.iter().position(|(spdk, _)| spdk.eq_ignore_ascii_case(name))
}

type Reload = reload::Handle<EnvFilter, Registry>;

/// The log's filter as the daemon runs it: the state, and the handle that puts a new filter
/// in force (none in unit tests, which have no subscriber).
pub struct LogControl {
    state: Mutex<LogState>,
    reload: Option<Reload>,
}

impl fmt::Debug for LogControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogControl").field("state", &*self.state.lock()).finish()
    }
}

/// The sink's format (`serve --log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

impl LogControl {
    /// Installs the process's subscriber (stderr, `format`) with the filter `RUST_LOG` asks
    /// for; a `RUST_LOG` the filter refuses leaves INFO (said in the log), as before.
    pub fn install(format: Format) -> anyhow::Result<Self> {
        let asked = LogState::from_env(std::env::var("RUST_LOG").ok().as_deref());
        let (state, filter, refused) = match EnvFilter::try_new(asked.directives()) {
            Ok(filter) => (asked, filter, None),
            Err(e) => {
                let state = LogState::from_env(None);
                let filter = EnvFilter::try_new(state.directives())?;
                (state, filter, Some(e.to_string()))
            }
        };
        let (filter, reload) = reload::Layer::new(filter);
        let registry = tracing_subscriber::registry().with(filter);
        match format {
            Format::Text => registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_writer(std::io::stderr)
                        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
                )
                .init(),
            Format::Json => registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .json()
                        .with_writer(std::io::stderr)
                        .with_current_span(false),
                )
                .init(),
        }
        if let Some(error) = refused {
            tracing::warn!(error, "RUST_LOG refused: logging at INFO");
        }
        Ok(LogControl { state: Mutex::new(state), reload: Some(reload) })
    }

    /// A control that changes no subscriber (unit tests).
    #[cfg(test)]
    pub fn detached() -> Self {
        LogControl { state: Mutex::new(LogState::from_env(None)), reload: None }
    }

    pub fn state(&self) -> LogState {
        self.state.lock().clone()
    }

    /// Applies `change` to the state and puts the resulting filter in force; a refused change
    /// (an unknown name) changes nothing.
    pub fn change(
        &self,
        change: impl FnOnce(&mut LogState) -> Result<(), LogError>,
    ) -> Result<LogState, LogError> {
        let mut state = self.state.lock();
        let mut next = state.clone();
        change(&mut next)?;
        if let Some(reload) = &self.reload {
            let filter = EnvFilter::try_new(next.directives())
                .map_err(|e| LogError::Reload(e.to_string()))?;
            reload.reload(filter).map_err(|e| LogError::Reload(e.to_string()))?;
        }
        *state = next;
        Ok(state.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_log_gives_the_level_and_keeps_its_targets() {
        let s = LogState::from_env(None);
        assert_eq!((s.level(), s.directives().as_str()), ("INFO", "info"));
        let s = LogState::from_env(Some("warn,ballast_nbd=debug"));
        assert_eq!((s.level(), s.directives().as_str()), ("WARNING", "warn,ballast_nbd=debug"));
        let s = LogState::from_env(Some("ballast_nvmf, debug"));
        assert_eq!((s.level(), s.directives().as_str()), ("DEBUG", "debug,ballast_nvmf"));
        // Levels SPDK has no name for are ours: the level (never a second bare directive).
        let s = LogState::from_env(Some("trace"));
        assert_eq!((s.level(), s.directives().as_str()), ("TRACE", "trace"));
        let s = LogState::from_env(Some("OFF,ballast_tls=warn"));
        assert_eq!((s.level(), s.directives().as_str()), ("OFF", "off,ballast_tls=warn"));
    }

    #[test]
    fn levels_and_flags_make_the_directives() {
        let mut s = LogState::from_env(Some("ballast_nbd=trace"));
        s.set_level("warning").unwrap();
        assert_eq!(s.level(), "WARNING");
        s.set_flag("NVMF_AUTH", true).unwrap();
        s.set_flag("lvol", true).unwrap();
        assert_eq!(
            s.directives(),
            "warn,ballast_nbd=trace,ballast_nvmf::auth=debug,ballast_volume=debug,\
             ballast_engine::volume=debug"
        );
        s.set_flag("lvol", false).unwrap();
        assert_eq!(s.directives(), "warn,ballast_nbd=trace,ballast_nvmf::auth=debug");
        let set: Vec<_> = s.flags().filter(|f| f.1).map(|f| f.0).collect();
        assert_eq!(set, ["nvmf_auth"]);
        // NOTICE shows what INFO shows, and keeps its name.
        s.set_level("NOTICE").unwrap();
        assert_eq!((s.level(), s.directives().starts_with("info,")), ("NOTICE", true));
        for (_, targets) in FLAGS {
            for t in *targets {
                assert!(EnvFilter::try_new(format!("{t}=debug")).is_ok(), "{t}");
            }
        }
    }

    #[test]
    fn unknown_names_change_nothing() {
        let c = LogControl::detached();
        let before = c.state();
        assert_eq!(c.change(|s| s.set_level("LOUD")), Err(LogError::Level("LOUD".into())));
        assert_eq!(
            c.change(|s| s.set_flag("bdev_nvme", true)),
            Err(LogError::Flag("bdev_nvme".into()))
        );
        assert_eq!(c.state(), before);
        let after = c.change(|s| s.set_level("debug")).unwrap();
        assert_eq!((after.level(), c.state().level()), ("DEBUG", "DEBUG"));
    }
}
