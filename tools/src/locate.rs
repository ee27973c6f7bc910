//! Where the control socket is: the places the CLI looks for a running daemon, and the pointer
//! `serve` leaves in a runtime directory so that the CLI finds the daemon from any directory.
//!
//! The CLI takes the first of: `--rpc-socket PATH`, `--data-dir DIR` (its `ballast.sock`),
//! `$BALLAST_RPC_SOCKET`; without any of them it tries in order `./ballast-data/ballast.sock`,
//! `$XDG_RUNTIME_DIR/ballast/ctl.sock`, `/run/ballast/ctl.sock` and takes the first it can
//! connect to. A pointer is a symlink to the daemon's real socket.
//!
//! Invariants:
//! - A pointer adds no access: the socket it names keeps its 0600 mode and SO_PEERCRED check.
//! - A pointer lives only in a directory owned by root or the user at hand that no one else may
//!   write: `serve` refuses to publish into any other (and creates its own 0700), and the CLI
//!   does not follow a pointer out of any other (it could lead to someone else's socket); nor
//!   does it use a `./ballast-data/ballast.sock` whose directory is not such a one (`serve`
//!   creates its data directory 0700).
//! - `serve` replaces an existing pointer only when connecting through it fails (stale), and
//!   at a clean stop removes it only while it still names its own socket.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// The socket's name inside a data directory.
pub const DATA_DIR_SOCKET: &str = "ballast.sock";
/// The data directory `serve` uses by default, relative to where it runs.
pub const DEFAULT_DATA_DIR: &str = "ballast-data";
/// The pointer's name inside a runtime directory.
pub const POINTER_NAME: &str = "ctl.sock";
/// The system-wide runtime directory (root's daemon publishes there).
pub const SYSTEM_RUNTIME_DIR: &str = "/run/ballast";
/// The environment variable naming the socket for the CLI.
pub const SOCKET_ENV: &str = "BALLAST_RPC_SOCKET";

/// Why the CLI found no daemon to talk to.
#[derive(Debug, thiserror::Error)]
pub enum FindError {
    #[error("permission denied: the control socket {0} is only for root and the daemon's user")]
    PermissionDenied(PathBuf),
    #[error("cannot reach the daemon at {path} (is `ballast serve` running?)")]
    Unreachable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "no running daemon found (is `ballast serve` running?); looked at:\n{}\n\
         give --rpc-socket PATH or --data-dir DIR if it runs elsewhere",
        list(.tried)
    )]
    NotFound { tried: Vec<(PathBuf, String)> },
}

fn list(tried: &[(PathBuf, String)]) -> String {
    let lines: Vec<String> =
        tried.iter().map(|(path, why)| format!("  {}: {why}", path.display())).collect();
    lines.join("\n")
}

/// Why `serve` left no pointer.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{link} is another live daemon's pointer (to {points_to}); left as it is")]
    Live { link: PathBuf, points_to: String },
    #[error("{dir}: {why}; no pointer left there")]
    Untrusted { dir: PathBuf, why: String },
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path, what: &'static str) -> impl FnOnce(io::Error) -> PublishError {
    let path = path.to_path_buf();
    move |source| PublishError::Io { path, what, source }
}

/// Where the CLI looks when told nothing, in order.
pub fn search_path(xdg_runtime_dir: Option<&Path>) -> Vec<PathBuf> {
    let mut paths = vec![Path::new(DEFAULT_DATA_DIR).join(DATA_DIR_SOCKET)];
    paths.extend(pointer_dirs(xdg_runtime_dir).into_iter().map(|d| d.join(POINTER_NAME)));
    assert!(paths.len() >= 2);
    paths
}

/// The runtime directories a pointer may be in, in the order the CLI looks.
fn pointer_dirs(xdg_runtime_dir: Option<&Path>) -> Vec<PathBuf> {
    let xdg = xdg_runtime_dir.filter(|d| d.is_absolute()).map(|d| d.join("ballast"));
    xdg.into_iter().chain([PathBuf::from(SYSTEM_RUNTIME_DIR)]).collect()
}

/// Where a daemon of user `euid` publishes its pointer: `$XDG_RUNTIME_DIR/ballast` when set,
/// else `/run/ballast` for root, else nowhere.
pub fn publish_dir(xdg_runtime_dir: Option<&Path>, euid: u32) -> Option<PathBuf> {
    match xdg_runtime_dir.filter(|d| d.is_absolute()) {
        Some(d) => Some(d.join("ballast")),
        None if euid == 0 => Some(PathBuf::from(SYSTEM_RUNTIME_DIR)),
        None => None,
    }
}

pub fn xdg_runtime_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()).map(PathBuf::from)
}

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Why `dir` may not hold a pointer for user `euid`, if it may not.
pub fn untrusted(dir: &Path, euid: u32) -> Option<String> {
    let meta = match dir.symlink_metadata() {
        Ok(m) => m,
        Err(e) => return Some(e.to_string()),
    };
    if !meta.is_dir() {
        return Some("not a directory".into());
    }
    if meta.uid() != 0 && meta.uid() != euid {
        return Some(format!("owned by uid {}, not root or uid {euid}", meta.uid()));
    }
    if meta.mode() & 0o022 != 0 {
        return Some(format!("writable by others (mode {:o})", meta.mode() & 0o7777));
    }
    None
}

/// Connects to the daemon the CLI's flags and environment name, or to the first one found on
/// the search path; returns the stream and the path it came through.
pub fn connect(
    rpc_socket: Option<&Path>,
    data_dir: Option<&Path>,
) -> Result<(UnixStream, PathBuf), FindError> {
    let explicit = match (rpc_socket, data_dir) {
        (Some(p), _) => Some(p.to_path_buf()),
        (None, Some(d)) => Some(d.join(DATA_DIR_SOCKET)),
        (None, None) => std::env::var_os(SOCKET_ENV).filter(|v| !v.is_empty()).map(PathBuf::from),
    };
    if let Some(path) = explicit {
        return match UnixStream::connect(&path) {
            Ok(s) => Ok((s, path)),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                Err(FindError::PermissionDenied(path))
            }
            Err(source) => Err(FindError::Unreachable { path, source }),
        };
    }
    search(&search_path(xdg_runtime_dir().as_deref()), euid())
}

/// Tries each path of `paths` in order. A path that is missing or that nothing listens on is
/// passed over; a live one the user may not use ends the search, saying so.
fn search(paths: &[PathBuf], euid: u32) -> Result<(UnixStream, PathBuf), FindError> {
    let mut tried = Vec::with_capacity(paths.len());
    for path in paths {
        let shown = std::path::absolute(path).unwrap_or_else(|_| path.clone());
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if path.symlink_metadata().is_err() {
            tried.push((shown, "no such file".to_string()));
            continue;
        }
        // A pointer, or a ./ballast-data found in whatever directory the CLI runs from (a
        // shared one, say): a socket there is someone's only if the directory is theirs or
        // root's and no one else may write in it — else it could be a stranger's socket that
        // collects the requests (key names, DH-HMAC-CHAP secrets given inline) sent to it.
        if let Some(why) = untrusted(dir, euid) {
            tried.push((shown, format!("not followed: {} is {why}", dir.display())));
            continue;
        }
        match UnixStream::connect(path) {
            Ok(s) => return Ok((s, path.clone())),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return Err(FindError::PermissionDenied(shown))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tried.push((shown, "stale: the socket it names is gone".to_string()));
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tried.push((shown, "stale: no daemon listening".to_string()));
            }
            Err(e) => tried.push((shown, e.to_string())),
        }
    }
    assert_eq!(tried.len(), paths.len());
    Err(FindError::NotFound { tried })
}

/// A pointer `serve` published: removed again when dropped, if it still names our socket.
#[derive(Debug)]
pub struct Pointer {
    link: PathBuf,
    socket: PathBuf,
}

impl Pointer {
    pub fn link(&self) -> &Path {
        &self.link
    }

    /// Leaves `dir/ctl.sock` naming `socket` (an absolute path, already listening): creates
    /// `dir` (0700) if missing; replaces an existing pointer only if it is stale.
    pub fn publish(dir: &Path, socket: &Path) -> Result<Pointer, PublishError> {
        assert!(socket.is_absolute());
        let euid = euid();
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(dir, "creating the runtime directory")(e)),
        }
        if let Some(why) = untrusted(dir, euid) {
            return Err(PublishError::Untrusted { dir: dir.to_path_buf(), why });
        }
        let link = dir.join(POINTER_NAME);
        let pointer = Pointer { link: link.clone(), socket: socket.to_path_buf() };
        match std::fs::read_link(&link) {
            // Ours already (a restart after kill -9 with the same socket path).
            Ok(to) if to == socket => return Ok(pointer),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            // A pointer to another socket, or something else at the path: kept while live.
            other => {
                if UnixStream::connect(&link).is_ok() {
                    let points_to = match other {
                        Ok(to) => to.display().to_string(),
                        Err(_) => "itself, not a link".to_string(),
                    };
                    return Err(PublishError::Live { link, points_to });
                }
            }
        }
        // Made aside and renamed into place: the link is never absent or half-made.
        let temp = dir.join(format!(".{POINTER_NAME}.{}", std::process::id()));
        let _ = std::fs::remove_file(&temp);
        std::os::unix::fs::symlink(socket, &temp).map_err(io_err(&temp, "making the link"))?;
        if let Err(e) = std::fs::rename(&temp, &link) {
            let _ = std::fs::remove_file(&temp);
            return Err(io_err(&link, "moving the link into place")(e));
        }
        assert_eq!(std::fs::read_link(&link).ok().as_deref(), Some(socket));
        Ok(pointer)
    }
}

impl Drop for Pointer {
    fn drop(&mut self) {
        if std::fs::read_link(&self.link).ok().as_deref() == Some(self.socket.as_path()) {
            if let Err(e) = std::fs::remove_file(&self.link) {
                tracing::warn!(pointer = %self.link.display(), error = %e, "cannot remove");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixListener;

    /// A fresh scratch directory, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir =
                std::env::temp_dir().join(format!("ballast-locate-{name}.{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn search_order() {
        let with = search_path(Some(Path::new("/run/user/1000")));
        let want = ["ballast-data/ballast.sock", "/run/user/1000/ballast/ctl.sock"];
        assert_eq!(with[..2], want.map(PathBuf::from));
        assert_eq!(with[2], PathBuf::from("/run/ballast/ctl.sock"));
        let without = search_path(None);
        assert_eq!(
            without,
            ["ballast-data/ballast.sock", "/run/ballast/ctl.sock"].map(PathBuf::from)
        );
        // A relative XDG_RUNTIME_DIR is invalid (the spec says to ignore it).
        assert_eq!(search_path(Some(Path::new("rel"))), without);
    }

    #[test]
    fn publish_dirs() {
        let xdg = Some(Path::new("/run/user/1000"));
        assert_eq!(publish_dir(xdg, 1000), Some(PathBuf::from("/run/user/1000/ballast")));
        assert_eq!(publish_dir(xdg, 0), Some(PathBuf::from("/run/user/1000/ballast")));
        assert_eq!(publish_dir(None, 0), Some(PathBuf::from("/run/ballast")));
        assert_eq!(publish_dir(None, 1000), None);
    }

    #[test]
    fn publish_replace_stale_keep_live_remove_own() {
        let t = Scratch::new("publish");
        let dir = t.0.join("rt");
        let (a, b) = (t.0.join("a.sock"), t.0.join("b.sock"));
        let listen_a = UnixListener::bind(&a).unwrap();
        let pointer = Pointer::publish(&dir, &a).unwrap();
        let mode = dir.symlink_metadata().unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert_eq!(std::fs::read_link(pointer.link()).unwrap(), a);
        // Found through the search path, from anywhere.
        let (_s, via) = search(&[t.0.join("none.sock"), dir.join(POINTER_NAME)], euid()).unwrap();
        assert_eq!(via, dir.join(POINTER_NAME));

        // A second daemon leaves a live pointer alone.
        let _listen_b = UnixListener::bind(&b).unwrap();
        assert!(matches!(Pointer::publish(&dir, &b), Err(PublishError::Live { .. })));
        assert_eq!(std::fs::read_link(dir.join(POINTER_NAME)).unwrap(), a);

        // A stale one (nothing listens on a) is replaced; the old owner then leaves it alone.
        drop(listen_a);
        let err = search(&[dir.join(POINTER_NAME)], euid()).unwrap_err().to_string();
        assert!(err.contains("ctl.sock: stale"), "{err}");
        let pointer_b = Pointer::publish(&dir, &b).unwrap();
        drop(pointer);
        assert_eq!(std::fs::read_link(dir.join(POINTER_NAME)).unwrap(), b);
        drop(pointer_b);
        assert!(dir.join(POINTER_NAME).symlink_metadata().is_err());
    }

    #[test]
    fn untrusted_directory() {
        let t = Scratch::new("untrusted");
        let sock = t.0.join("a.sock");
        let _listen = UnixListener::bind(&sock).unwrap();
        let dir = t.0.join("rt");
        let _pointer = Pointer::publish(&dir, &sock).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = search(&[dir.join(POINTER_NAME)], euid()).unwrap_err().to_string();
        assert!(err.contains("not followed"), "{err}");
        assert!(err.contains("writable by others (mode 777)"), "{err}");
        let refused = Pointer::publish(&dir, &sock);
        assert!(matches!(refused, Err(PublishError::Untrusted { .. })), "{refused:?}");
    }

    #[test]
    fn a_data_dir_socket_in_a_directory_not_ours_is_not_used() {
        let t = Scratch::new("datadir");
        let dir = t.0.join(DEFAULT_DATA_DIR);
        std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        let sock = dir.join(DATA_DIR_SOCKET);
        let _listen = UnixListener::bind(&sock).unwrap();
        let (_s, via) = search(std::slice::from_ref(&sock), euid()).unwrap();
        assert_eq!(via, sock, "a 0700 directory of our own: used");

        // Someone else's directory (as root: handed to nobody; otherwise: searched as if by
        // another user).
        let me = euid();
        let (owner, searcher) = if me == 0 {
            std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
            (65534, 0)
        } else {
            (me, me + 1)
        };
        let err = search(std::slice::from_ref(&sock), searcher).unwrap_err().to_string();
        assert!(err.contains("not followed"), "{err}");
        assert!(err.contains(&format!("owned by uid {owner}, not root")), "{err}");

        // Ours again, but anyone may write in it.
        if me == 0 {
            std::os::unix::fs::chown(&dir, Some(0), None).unwrap();
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = search(std::slice::from_ref(&sock), me).unwrap_err().to_string();
        assert!(err.contains("writable by others (mode 777)"), "{err}");
    }

    #[test]
    fn not_found_lists_every_place() {
        let t = Scratch::new("notfound");
        let paths = [t.0.join("x/ballast.sock"), t.0.join("y/ctl.sock")];
        let err = search(&paths, euid()).unwrap_err().to_string();
        assert!(err.starts_with("no running daemon found"), "{err}");
        for p in &paths {
            assert!(err.contains(&format!("{}: no such file", p.display())), "{err}");
        }
    }
}
