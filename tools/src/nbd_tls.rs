//! `serve`'s NBD TLS settings: the mode (off / on / require), the credentials (X.509
//! certificate and key, a CA for client certificates, a PSK file in nbdkit's format) and the
//! per-export allow-lists by TLS identity. Checked and loaded once at startup; a bad setting
//! stops the daemon with an error naming the flag, never with a secret in it.

use std::path::PathBuf;

use anyhow::{bail, Context};
use ballast_nbd::{ExportTable, NbdTls, TlsMode};
use ballast_tls::{ServerConfig, TlsServer};
use clap::Args;

#[derive(Args, Debug, Default)]
pub struct NbdTlsArgs {
    /// NBD over TLS: off (STARTTLS refused), on (clients may upgrade with NBD_OPT_STARTTLS;
    /// exports with an allow-list need it), or require (nothing but STARTTLS before TLS).
    #[arg(long, value_enum, default_value = "off")]
    nbd_tls: NbdTlsMode,
    /// PEM certificate chain the NBD server presents (with --nbd-tls-key).
    #[arg(long, value_name = "PATH")]
    nbd_tls_cert: Option<PathBuf>,
    /// PEM private key of --nbd-tls-cert (mode 0600: refused if group or others may read it).
    #[arg(long, value_name = "PATH")]
    nbd_tls_key: Option<PathBuf>,
    /// PEM CA certificates: clients must present a certificate that chains to them; its
    /// common name is the client's identity for --nbd-tls-allow.
    #[arg(long, value_name = "PATH")]
    nbd_tls_ca: Option<PathBuf>,
    /// TLS-PSK keys, nbdkit's format: `identity:hexkey` lines (mode 0600); the identity is
    /// the client's for --nbd-tls-allow.
    #[arg(long, value_name = "PATH")]
    nbd_tls_psk: Option<PathBuf>,
    /// Makes EXPORT TLS-only, for these identities (PSK user names or certificate common
    /// names), e.g. vol0=alice,bob (repeatable).
    #[arg(long = "nbd-tls-allow", value_name = "EXPORT=ID[,ID...]")]
    nbd_tls_allow: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum NbdTlsMode {
    #[default]
    Off,
    On,
    Require,
}

impl NbdTlsArgs {
    /// Loads the credentials and sets the allow-lists on `exports`.
    pub fn build(&self, exports: &ExportTable) -> anyhow::Result<NbdTls> {
        let mode = match self.nbd_tls {
            NbdTlsMode::Off => TlsMode::Off,
            NbdTlsMode::On => TlsMode::On,
            NbdTlsMode::Require => TlsMode::Require,
        };
        let has_credentials = self.nbd_tls_cert.is_some() || self.nbd_tls_psk.is_some();
        if mode == TlsMode::Off {
            if has_credentials || self.nbd_tls_ca.is_some() || !self.nbd_tls_allow.is_empty() {
                bail!("--nbd-tls-cert/-key/-ca/-psk/-allow need --nbd-tls on or require");
            }
            return Ok(NbdTls::default());
        }
        if !has_credentials {
            bail!("--nbd-tls {mode:?} needs --nbd-tls-cert and --nbd-tls-key, or --nbd-tls-psk");
        }
        let config = ServerConfig {
            cert: self.nbd_tls_cert.clone(),
            key: self.nbd_tls_key.clone(),
            ca: self.nbd_tls_ca.clone(),
            psk: self.nbd_tls_psk.clone(),
        };
        let server = TlsServer::new(&config).context("NBD TLS")?;
        for spec in &self.nbd_tls_allow {
            let (export, ids) = parse_allow(spec)?;
            if exports.get(&export).is_none() {
                // Kept for an export made later under that name; a misspelt one would leave
                // the intended export open to plaintext under `on`, so say so.
                tracing::warn!(
                    export,
                    "--nbd-tls-allow names no export now: it applies to one made later under \
                     that name (check the spelling)"
                );
            }
            exports.set_allowed(&export, ids);
        }
        tracing::info!(mode = ?mode, credentials = server.summary(), "NBD TLS enabled");
        Ok(NbdTls { mode, server: Some(server) })
    }
}

/// `EXPORT=ID[,ID...]`.
fn parse_allow(spec: &str) -> anyhow::Result<(String, Vec<String>)> {
    let Some((export, ids)) = spec.split_once('=') else {
        bail!("--nbd-tls-allow {spec:?}: expected EXPORT=ID[,ID...]");
    };
    let ids: Vec<String> = ids.split(',').map(str::trim).map(String::from).collect();
    if export.is_empty() || ids.iter().any(String::is_empty) {
        bail!("--nbd-tls-allow {spec:?}: an empty export name or identity");
    }
    Ok((export.to_string(), ids))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_specs() {
        assert_eq!(
            parse_allow("vol0=alice, bob").unwrap(),
            ("vol0".to_string(), vec!["alice".to_string(), "bob".to_string()])
        );
        assert!(parse_allow("vol0").is_err());
        assert!(parse_allow("vol0=alice,").is_err());
        assert!(parse_allow("=alice").is_err());
    }

    #[test]
    fn off_refuses_stray_credentials_and_on_needs_some() {
        let t = ExportTable::default();
        let stray = NbdTlsArgs { nbd_tls_psk: Some("/x".into()), ..Default::default() };
        assert!(stray.build(&t).is_err());
        let bare = NbdTlsArgs { nbd_tls: NbdTlsMode::Require, ..Default::default() };
        assert!(bare.build(&t).unwrap_err().to_string().contains("needs"));
        assert_eq!(NbdTlsArgs::default().build(&t).unwrap().mode, TlsMode::Off);
    }
}
