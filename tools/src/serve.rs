//! `ballast serve`: parses the settings, opens the backends, starts the cores, the NBD listener
//! and the control API, then waits for SIGINT/SIGTERM and shuts down in order.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{bail, Context};
use ballast_engine::limits::{Admission, ConnLimits};
use ballast_engine::listener::Acceptor;
use ballast_engine::size::parse_size;
use ballast_engine::volume::dev::{is_namespace, PoolHandle};
use ballast_engine::volume::pool::PoolGeometry;
use ballast_engine::{DeviceRingConfig, Engine, EngineConfig, Msg, Task};
use ballast_ffi::FixedConfig;
use clap::Args;
use nix::sys::signal::{SigSet, Signal};

use crate::control::Control;
use crate::listeners::{bind_retrying, start_nvmf_listener};
use crate::registry::{self, Registry, RegistryLimits};
use crate::rpc;

/// Size of the embedded default volume created on first run.
const DEFAULT_VOLUME_BYTES: u64 = 1 << 30;
/// Size of the embedded default pool (a sparse file in the data dir) created on first run.
const DEFAULT_POOL_BYTES: u64 = 10 << 30;
/// Default payload-memory budget: this, or 1/16 of RAM if that is smaller.
const BUFFER_MEMORY_DEFAULT: u64 = 256 << 20;
/// Submission entries of each core's device ring (NVMe passthrough); a full ring is submitted
/// and refilled, never an error.
const DEVICE_RING_ENTRIES: u32 = 256;
/// Smallest payload-memory budget per core (its largest single request is 3/4 of it, rounded
/// down to a power of two: 8 MiB here).
const BUFFER_MEMORY_PER_CORE_MIN: u64 = 16 << 20;
/// What one rate-limited export's waiting requests may hold of a core at the least: a share of
/// 0 would stop a limited export's connections before any of its requests waited, with nothing
/// ever to wake them; 1 MiB (NVMe/TCP's largest transfer) lets a few requests wait at once.
const QOS_WAIT_MEMORY_PER_CORE_MIN: u64 = 1 << 20;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Directory for the default pool and the control socket.
    #[arg(long, default_value = crate::locate::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// NBD listen address.
    #[arg(long, default_value = "127.0.0.1:10809")]
    nbd_listen: SocketAddr,
    /// NVMe/TCP listen address (I/O and discovery controllers).
    #[arg(long, default_value = "127.0.0.1:4420")]
    nvmf_listen: SocketAddr,
    /// What the --nvmf-listen and --discovery-listen listeners ask of hosts: none (plaintext),
    /// optional (TLS 1.3 or plaintext, as each host chooses) or required (TLS 1.3 only).
    /// Hosts get TLS keys through keyring_file_add_key and nvmf_subsystem_add_host --psk; a
    /// host with a key reaches its subsystem only over TLS with it, whatever this says.
    #[arg(long, value_enum, default_value = "none")]
    nvmf_secure_channel: SecureChannelArg,
    /// TLS records (NVMe/TCP and NBD): auto hands each TLS 1.3 or 1.2 (AEAD) session to the
    /// kernel's TLS (kTLS) once its handshake is done, where the kernel has it (the `tls`
    /// module), so the socket carries plaintext for us; off keeps them in OpenSSL.
    #[arg(long, value_enum, default_value = "auto")]
    kernel_tls: KernelTls,
    /// Threads that run TLS handshakes (key exchange, signatures: milliseconds of CPU each)
    /// off the data cores, so a burst of connections does not stall their I/O; 0 runs them
    /// on the cores.
    #[arg(long, default_value_t = ballast_engine::offload::THREADS_DEFAULT as u16,
          value_parser = clap::value_parser!(u16).range(0..=64))]
    offload_threads: u16,
    /// Handshake steps waiting for an offload thread at most; beyond, a core runs them itself.
    #[arg(long, default_value_t = ballast_engine::offload::QUEUE_DEFAULT as u32,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    offload_queue: u32,
    /// Files (the pool's, file exports, block devices) each core's io_uring may hold
    /// registered, so the kernel does not look the descriptor up and count a reference on
    /// every read and write; 0: none.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(0..=4096))]
    registered_files: u32,
    /// Buffers each core's io_uring may hold registered (its pool's, 4 KiB to 1 MiB), their
    /// pages pinned once instead of on every O_DIRECT read and write; 0: none. Pinned memory
    /// counts against RLIMIT_MEMLOCK for a daemon without CAP_IPC_LOCK: if it runs out, the
    /// core goes on with plain buffers for the rest of its life.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(0..=16384))]
    registered_buffers: u32,
    /// Kernel worker threads (io-wq) each core may have blocked in its operations at once, for
    /// files and block devices and again for sockets: a write that cannot go straight through
    /// (a buffered write waiting on its file's lock, a direct write allocating blocks) waits in
    /// one; beyond the limit such operations queue for the next free worker. 0: the kernel's
    /// defaults (up to four per CPU for files, the process's limit for sockets).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(0..=1024))]
    io_workers: u32,
    /// Extra NVMe/TCP listen address for discovery (conventionally port 8009).
    #[arg(long)]
    discovery_listen: Option<SocketAddr>,
    /// Hosts allowed to connect to the startup subsystems (repeatable); default: any host.
    #[arg(long = "allow-host", value_name = "HOSTNQN")]
    allow_hosts: Vec<String>,
    /// Number of data cores (reactor threads); default: every CPU we may run on.
    #[arg(long)]
    cores: Option<usize>,
    /// Control socket path. Default: <data-dir>/ballast.sock, with a pointer to it left at
    /// $XDG_RUNTIME_DIR/ballast/ctl.sock (or, for root without XDG_RUNTIME_DIR,
    /// /run/ballast/ctl.sock) so the CLI finds the daemon from any directory; an explicit
    /// path leaves no pointer.
    #[arg(long)]
    rpc_socket: Option<PathBuf>,
    /// An export, NAME=ram:SIZE, NAME=file:PATH[:SIZE] or NAME=nvme:/dev/ngXnY (an NVMe
    /// namespace through io_uring passthrough, each core submitting on its own NVMe queue;
    /// needs root and Linux >= 5.19) (repeatable); default: vol0 in the data dir.
    #[arg(long = "export", value_name = "NAME=SPEC")]
    exports: Vec<String>,
    /// NVMe passthrough exports use polled completions (IORING_SETUP_IOPOLL): a core with
    /// NVMe I/O in flight polls the device's completion queue instead of taking interrupts
    /// and does not sleep until it is done. Needs polled queues in the kernel driver
    /// (boot with nvme.poll_queues=N, N > 0); without them, I/O completes through interrupts.
    #[arg(long)]
    poll_device: bool,
    /// Serve the volumes of the pool on this file, block device or NVMe namespace
    /// (/dev/ngXnY, through passthrough) (create it with `ballast pool create`). Default, when no --export is given either: the pool
    /// <data-dir>/pool.img, created on first run (10 GiB sparse) with a 1 GiB volume vol0.
    #[arg(long)]
    pool: Option<PathBuf>,
    /// Export served for the empty name (default: the first).
    #[arg(long)]
    default_export: Option<String>,
    /// The longest a core keeps polling after its last work before it sleeps in the ring.
    /// Within it the core spins only while requests have been arriving often enough that
    /// sleeping and waking would cost more than waiting (about two inter-arrival gaps: a
    /// queue-depth-1 stream is served without wake-ups); an idle core sleeps within this
    /// bound, so an idle daemon uses no CPU. 0: never spin (the lowest CPU per I/O).
    #[arg(long, default_value_t = 1000)]
    poll_us: u64,
    /// Payload memory all cores together may hold: write data being received, read data
    /// waiting to be sent, grown receive buffers. Split evenly over the cores; a core out of
    /// it stops reading from its sockets until memory returns. Default: 256M or 1/16 of RAM,
    /// whichever is smaller (at least 16M per core).
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    buffer_memory: Option<u64>,
    /// Of that memory, what the requests of one rate-limited export (`bdev_set_qos_limit`,
    /// `ballast export limit`) may hold while they wait for their slot, all cores together
    /// (split evenly): once an export's waiting requests hold its share of a core, its
    /// connections there stop reading until some go, so a tenant held back by its limit cannot
    /// take the memory other exports' connections need. Default: 1/8 of --buffer-memory; at
    /// most --buffer-memory, at least 1M per core.
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    qos_wait_memory: Option<u64>,
    /// Connections served at once (NBD and NVMe/TCP together); more are refused.
    #[arg(long, default_value_t = 4096)]
    max_connections: u64,
    /// RAM, file and nvme exports at once (--export, export_add, bdev_malloc_create, ...); more
    /// are refused. Pool volumes are bounded by the pool.
    #[arg(long, value_name = "N", default_value_t = 4096,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_exports: u64,
    /// Bytes all RAM exports may come to together (their memory is taken as clients write):
    /// an export that would pass it is refused. Default: the machine's memory.
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    ram_export_memory: Option<u64>,
    /// Hosts one NVMe-oF subsystem may list (nvmf_subsystem_add_host); more are refused.
    #[arg(long, value_name = "N", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(1..=65_536))]
    max_hosts_per_subsystem: u64,
    /// NVMe reservation registrations one namespace keeps (hosts registered with a key);
    /// a host past it is refused its Reservation Register.
    #[arg(long, value_name = "N", default_value_t = ballast_nvmf::resv::REGISTRANTS_DEFAULT as u64,
          value_parser = clap::value_parser!(u64).range(1..=ballast_nvmf::resv::REGISTRANTS_LIMIT_MAX as u64))]
    nvmf_max_registrants: u64,
    /// Seconds an NBD handshake, or NVMe/TCP ICReq + Connect, may take before the connection
    /// is dropped.
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = parse_seconds)]
    handshake_timeout: std::time::Duration,
    /// Seconds a connection may owe progress (a write payload still arriving, replies it does
    /// not read) without making any before it is dropped and its memory returns. Judged at
    /// the connection's checks, a quarter of the shorter deadline apart (50 ms to 1 s): the
    /// drop comes up to two checks after the deadline.
    #[arg(long, value_name = "SECONDS", default_value = "30", value_parser = parse_seconds)]
    stall_timeout: std::time::Duration,
    /// Pending journal records (mapping changes of completed writes, trims) after which the
    /// pool commits without waiting for a client's flush: bounds the memory they hold.
    #[arg(long, value_name = "RECORDS", default_value_t = 4096,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    commit_records: u64,
    /// Seconds after the first pending record at which the pool commits when no client
    /// flushed: bounds how much unflushed work a crash can lose.
    #[arg(long, value_name = "SECONDS", default_value = "1", value_parser = parse_seconds)]
    commit_interval: std::time::Duration,
    /// Seconds a snapshot, rollback, resize or delete waits for the volume's writes in flight
    /// to finish; past it the operation fails (busy) and nothing changes.
    #[arg(long, value_name = "SECONDS", default_value = "30", value_parser = parse_seconds)]
    quiesce_timeout: std::time::Duration,
    /// MiB per second that decoupling and inflating volumes copy, all of them together
    /// (`bdev_lvol_decouple_parent`, `bdev_lvol_inflate`; 0: as fast as the cores and media
    /// go): what is left of the media's bandwidth, and of a core's CPU on a pool in memory,
    /// stays with the volumes' I/O. Changed while serving with `ballast pool copy-rate`.
    #[arg(long, value_name = "MIB", default_value_t = ballast_engine::volume::pace::DEFAULT_COPY_RATE >> 20,
          value_parser = clap::value_parser!(u64).range(0..=crate::volumes::COPY_RATE_MAX_MIB))]
    copy_rate: u64,
    /// Decouplings and inflations running at once; one more is refused (busy) until one ends.
    /// Each holds a control client (`--rpc-max-clients`) for as long as it copies: keep it
    /// below that, so the control socket stays open to other requests.
    #[arg(long, value_name = "N", default_value_t = ballast_engine::volume::dev::DEFAULT_MAX_DECOUPLES,
          value_parser = clap::value_parser!(u64).range(1..=256))]
    max_decouples: u64,
    /// Which core runs a volume's I/O: `any`, the core the command arrived on (a family's
    /// decisions may come from several cores, each under the family's lock); `owner`, the
    /// core owning the volume's family (a volume with its snapshots and clones), so one core
    /// alone touches a family's state: NBD connections and NVMe/TCP I/O queues move to that
    /// core once they know their volume (a family without an owner gets the core owning the
    /// fewest), and commands that still arrive elsewhere (userspace-TLS connections, which
    /// stay) are forwarded to it in batches. Under `owner` one hot volume is served by one
    /// core (perf/RESULTS.md §6.10).
    #[arg(long, value_name = "WHERE", default_value = "any")]
    volume_placement: VolumePlacement,
    /// Log lines as human-readable text, or as one JSON object per line for log collectors.
    #[arg(long, value_enum, default_value = "text")]
    log_format: crate::logging::Format,
    /// Control socket limits (--rpc-max-clients, --rpc-max-request, --rpc-idle-timeout).
    #[command(flatten)]
    rpc_limits: rpc::RpcLimitArgs,
    /// Prometheus metrics endpoint (--metrics-listen, off by default; its limits).
    #[command(flatten)]
    metrics: crate::metrics_http::MetricsArgs,
    /// NBD over TLS (--nbd-tls, its credentials and allow-lists).
    #[command(flatten)]
    nbd_tls: crate::nbd_tls::NbdTlsArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum VolumePlacement {
    Owner,
    Any,
}

impl From<VolumePlacement> for ballast_engine::volume::forward::Placement {
    fn from(p: VolumePlacement) -> Self {
        use ballast_engine::volume::forward::Placement;
        match p {
            VolumePlacement::Owner => Placement::Owner,
            VolumePlacement::Any => Placement::Any,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelTls {
    Auto,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SecureChannelArg {
    None,
    Optional,
    Required,
}

impl From<SecureChannelArg> for ballast_nvmf::tls::SecureChannel {
    fn from(a: SecureChannelArg) -> Self {
        use ballast_nvmf::tls::SecureChannel as S;
        match a {
            SecureChannelArg::None => S::None,
            SecureChannelArg::Optional => S::Optional,
            SecureChannelArg::Required => S::Required,
        }
    }
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

fn parse_seconds(s: &str) -> Result<std::time::Duration, String> {
    let secs: f64 = s.parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(0.01..=86_400.0).contains(&secs) {
        return Err(format!("{s} seconds is out of range (0.01 to 86400)"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// The budget for `cores` cores: the flag, or the default; refused below the per-core floor.
fn buffer_budget(flag: Option<u64>, cores: usize) -> anyhow::Result<u64> {
    let floor = BUFFER_MEMORY_PER_CORE_MIN * cores as u64;
    let total = match flag {
        Some(b) if b < floor => bail!(
            "--buffer-memory {b} is below {} MiB per core ({cores} cores: at least {} MiB)",
            BUFFER_MEMORY_PER_CORE_MIN >> 20,
            floor >> 20
        ),
        Some(b) => b,
        None => BUFFER_MEMORY_DEFAULT.min(registry::physical_memory() / 16).max(floor),
    };
    Ok(total)
}

/// Physical memory, from /proc/meminfo (a large default if it cannot be read).
/// Whether a backend spec needs each core's device ring.
pub fn needs_device_ring(spec: &str) -> bool {
    spec.starts_with("nvme:")
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let log = crate::logging::LogControl::install(args.log_format)?;
    let nvmf_addrs =
        crate::listeners::startup_addrs(args.nbd_listen, args.nvmf_listen, args.discovery_listen)?;
    let notifier = crate::notify::Notifier::from_env()?.map(Arc::new);
    raise_fd_limit();
    // Before anything writes (a pool's replay, a new export's file): a write reaching the
    // file size limit fails with EFBIG instead of ending the process.
    ballast_ffi::sys::ignore_file_size_signal()?;
    // The data directory holds the default pool, the control socket's directory and kept
    // state: the daemon's user's alone (existing directories are left as they are).
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    if let Some(why) = crate::locate::untrusted(&args.data_dir, nix::unistd::geteuid().as_raw()) {
        tracing::warn!(
            data_dir = %args.data_dir.display(),
            "the data directory is {why}: the CLI will not find the daemon through \
             ./{}/{} there (give it --data-dir, or chmod 700 the directory)",
            crate::locate::DEFAULT_DATA_DIR,
            crate::locate::DATA_DIR_SOCKET
        );
    }

    let pool_path = match (&args.pool, args.exports.is_empty()) {
        (Some(p), _) => Some(p.clone()),
        (None, true) => {
            let path = args.data_dir.join("pool.img");
            if !path.exists() {
                create_default_pool(&path)?;
            }
            Some(path)
        }
        (None, false) => None,
    };
    if let Some(path) = &pool_path {
        warn_if_others_may_read(path);
    }
    let pool = match &pool_path {
        Some(path) => {
            let t = std::time::Instant::now();
            let pool = PoolHandle::open(path)
                .with_context(|| format!("refusing to serve the pool on {}", path.display()))?;
            let info = pool.info();
            tracing::info!(
                path = %path.display(),
                volumes = info.volumes,
                free_bytes = info.free_bytes,
                open_ms = t.elapsed().as_millis() as u64,
                "pool opened"
            );
            Some(pool)
        }
        None => None,
    };
    // Signals are taken synchronously by this thread; every thread started below inherits the
    // mask (the reservations' saver, the reactors, the offload threads), so SIGINT/SIGTERM
    // never interrupt one, nor end the daemon where the stop should decide.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block()?;

    let target = Arc::new(ballast_nvmf::Target::default());
    target.resv_registrants.store(args.nvmf_max_registrants as usize, Ordering::Relaxed);
    let limits = RegistryLimits {
        max_exports: args.max_exports as usize,
        ram_bytes: args.ram_export_memory.unwrap_or_else(registry::physical_memory),
    };
    if let Some(pool) = &pool {
        // Before any namespace exists: each finds its kept reservations when it is added.
        target
            .keep_reservations(Arc::new(crate::resv_store::PoolResvStore::new(pool.clone())))
            .context("starting the thread that keeps NVMe reservations")?;
    }
    let registry = Arc::new(Registry::with_limits(target.clone(), pool.clone(), limits));
    for spec in &args.exports {
        let Some((name, backend)) = spec.split_once('=') else {
            bail!(
                "--export {spec:?}: expected NAME=ram:SIZE, NAME=file:PATH[:SIZE] or \
                 NAME=nvme:/dev/ngXnY"
            );
        };
        registry::add_export(&registry, name, backend, false, String::new())
            .with_context(|| format!("export {name}"))?;
    }

    let cpus = ballast_ffi::sys::allowed_cpus();
    let count = args.cores.unwrap_or(cpus.len()).clamp(1, cpus.len());
    let buffer_memory = buffer_budget(args.buffer_memory, count)?;
    let qos_wait_memory = match args.qos_wait_memory {
        Some(m) if m > buffer_memory => {
            bail!("--qos-wait-memory {m} is more than --buffer-memory ({buffer_memory})")
        }
        // A core whose share were 0 would stop a limited export's connections before any of
        // its requests waited, with nothing ever to wake them.
        Some(m) if m < QOS_WAIT_MEMORY_PER_CORE_MIN * count as u64 => bail!(
            "--qos-wait-memory {m} is below {} MiB per core ({count} cores: at least {} MiB)",
            QOS_WAIT_MEMORY_PER_CORE_MIN >> 20,
            (QOS_WAIT_MEMORY_PER_CORE_MIN * count as u64) >> 20
        ),
        Some(m) => m,
        None => buffer_memory / 8,
    };
    let config = EngineConfig {
        cpus: cpus[..count].to_vec(),
        poll_us: args.poll_us,
        ring_entries: 1024,
        mailbox_depth: 1024,
        buffer_budget: buffer_memory / count as u64,
        qos_wait_budget: Some(qos_wait_memory / count as u64),
        device_ring: (args
            .exports
            .iter()
            .any(|spec| spec.split_once('=').is_some_and(|(_, b)| needs_device_ring(b)))
            || args.pool.as_deref().is_some_and(is_namespace))
        .then_some(DeviceRingConfig { entries: DEVICE_RING_ENTRIES, poll: args.poll_device }),
        offload_threads: usize::from(args.offload_threads),
        offload_queue: args.offload_queue as usize,
        fixed: FixedConfig { files: args.registered_files, bufs: args.registered_buffers },
        io_workers: args.io_workers,
    };
    if args.poll_device && config.device_ring.is_none() {
        tracing::warn!("--poll-device has no effect: no nvme: export and no pool on a namespace");
    }
    let admission = Admission::new(ConnLimits {
        max_connections: args.max_connections.max(1),
        handshake_timeout: args.handshake_timeout,
        stall_timeout: args.stall_timeout,
    });
    tracing::info!(
        buffer_memory,
        qos_wait_memory,
        max_connections = admission.limits.max_connections,
        handshake_timeout_ms = args.handshake_timeout.as_millis() as u64,
        stall_timeout_ms = args.stall_timeout.as_millis() as u64,
        "limits"
    );
    // Before any listener: no session may start with offload on when the operator said off.
    if args.kernel_tls == KernelTls::Off {
        ballast_tls::ktls::disable_offload();
    }
    let engine = Engine::start(config).context("starting the engine")?;
    let handles = engine.handles();
    // From here a failure stops the cores and commits (as a clean stop does): clients may be
    // served already (the NVMe/TCP listeners start before the rest).
    let mut running =
        StopOnError { engine: Some(engine), registry: registry.clone(), pool: pool.clone() };
    if let Some(pool) = &pool {
        pool.set_commit_policy(args.commit_records as usize, args.commit_interval);
        pool.set_quiesce_timeout(args.quiesce_timeout);
        pool.set_copy_rate(args.copy_rate << 20);
        pool.set_max_decouples(args.max_decouples);
        let clients = args.rpc_limits.limits().max_clients as u64;
        if args.max_decouples >= clients {
            tracing::warn!(
                max_decouples = args.max_decouples,
                rpc_max_clients = clients,
                "decouplings running at the limit would hold every control client: the control \
                 socket would refuse other requests until one ends"
            );
        }
        pool.set_placement(args.volume_placement.into());
        pool.attach_cores(handles.clone());
    }

    let control = Arc::new(Control {
        registry: registry.clone(),
        target: target.clone(),
        cores: handles.clone(),
        pool: pool.clone(),
        allow_hosts: args.allow_hosts.clone(),
        admission: admission.clone(),
        buffer_memory,
        started: std::time::Instant::now(),
        keyring: crate::keyring::Keyring::default(),
        host_keys: Default::default(),
        max_hosts: args.max_hosts_per_subsystem as usize,
        settings: Default::default(),
        malloc_names: Default::default(),
        log,
        default_export: args.default_export.clone(),
    });
    // The daemon's own subsystems (volumes', startup exports') listen on --nvmf-listen; the
    // discovery listener serves the whole discovery log.
    target.default_listeners.write().insert(args.nvmf_listen.into());
    if let Some(addr) = args.discovery_listen {
        target.discovery_services.write().insert(addr.into());
    }
    let plain_exports: Vec<String> = registry.list().iter().map(|e| e.name.clone()).collect();
    if let Some(pool) = &pool {
        crate::volumes::export_all(&control, pool)?;
    }
    if let Some(name) = &args.default_export {
        registry.set_default(name)?;
    }
    for name in &plain_exports {
        let nqn = format!("{}{name}", ballast_nvmf::NQN_PREFIX);
        let subsys = target.create_subsystem(&nqn, args.allow_hosts.is_empty())?;
        subsys.hosts.write().extend(args.allow_hosts.iter().cloned());
        registry.add_namespace(&nqn, 1, None, name, 4096)?;
    }
    // Nothing listens yet: each listener's secure channel, then what the pool keeps (the
    // keyring, subsystems' hosts and keys, listeners) are in place before the first accept.
    if args.nvmf_secure_channel != SecureChannelArg::None {
        for addr in &nvmf_addrs {
            let via = ballast_nvmf::ListenAddr::from(*addr);
            target.set_secure_channel(via, args.nvmf_secure_channel.into());
        }
    }
    let kept_addrs = crate::persist::restore(&control);
    for addr in nvmf_addrs {
        start_nvmf_listener(&handles, &target, &admission, addr)?;
    }
    for addr in kept_addrs {
        if target.port_id(&addr.into()).is_some() {
            continue;
        }
        if let Err(e) = start_nvmf_listener(&handles, &target, &admission, addr) {
            tracing::warn!(%addr, error = %format!("{e:#}"), "kept listener cannot be bound");
            crate::persist::unbindable(&control, addr);
        }
    }

    let listener = bind_retrying(args.nbd_listen)
        .with_context(|| format!("binding NBD on {}", args.nbd_listen))?;
    let nbd_tls = args.nbd_tls.build(&registry.nbd_exports())?;
    let factory = ballast_nbd::conn_factory(registry.nbd_exports(), nbd_tls);
    let nbd_admission = admission.clone();
    let spawn = Msg::Spawn(Box::new(move |_cx| {
        Box::new(Acceptor::new(listener, "nbd", factory, nbd_admission)) as Box<dyn Task>
    }));
    if !handles[0].send_blocking(spawn) {
        bail!("core 0 is not running");
    }

    let socket = args
        .rpc_socket
        .clone()
        .unwrap_or_else(|| args.data_dir.join(crate::locate::DATA_DIR_SOCKET));
    let socket = std::path::absolute(&socket)
        .with_context(|| format!("control socket {}", socket.display()))?;
    if let Some(addr) = args.metrics.metrics_listen {
        crate::metrics_http::start(addr, control.clone(), args.metrics.limits())?;
    }
    rpc::start(&socket, control, args.rpc_limits.limits())?;
    let pointer = if args.rpc_socket.is_none() { publish_pointer(&socket) } else { None };
    tracing::info!(
        cores = count,
        exports = registry.list().len(),
        socket = %socket.display(),
        "ballast serving"
    );
    let watchdog = match &notifier {
        Some(n) => {
            n.send(&format!(
                "READY=1\nSTATUS=serving {} exports on {} cores",
                registry.list().len(),
                count
            ));
            match crate::notify::watchdog_interval() {
                Some(every) => Some(
                    crate::notify::start_watchdog(n.clone(), handles.clone(), every)
                        .context("starting the watchdog thread")?,
                ),
                None => None,
            }
        }
        None => None,
    };

    let signal = signals.wait()?;
    tracing::info!(?signal, "shutting down: draining connections (a second signal exits at once)");
    // A second signal while the stop drains (up to its deadline per core) ends the process
    // then: what was flushed is in the journal (as after kill -9); what is skipped is the
    // final flush and checkpoint, which the next start makes up by replaying.
    std::thread::Builder::new()
        .name("second-signal".into())
        .spawn(move || {
            if let Ok(again) = signals.wait() {
                tracing::warn!(
                    signal = ?again,
                    "second signal while stopping: exiting now, without the final commit"
                );
                // No exit handlers: the main thread may be running them itself.
                ballast_ffi::sys::exit_now(128 + again as i32);
            }
        })
        .context("starting the second-signal thread")?;
    if let Some(n) = &notifier {
        n.send("STOPPING=1\nSTATUS=draining connections");
    }
    drop(watchdog);
    let engine = running.engine.take().expect("the engine runs until the signal");
    final_stop(engine, &registry, pool.as_ref());
    drop(pointer);
    let _ = std::fs::remove_file(&socket);
    tracing::info!("stopped");
    Ok(())
}

/// The cores stopped, then every device flushed and the pool checkpointed: what a stop leaves.
fn final_stop(engine: Engine, registry: &Registry, pool: Option<&Arc<PoolHandle>>) {
    engine.shutdown();
    for dev in registry.list().iter().map(|d| &d.dev) {
        if let Err(e) = dev.flush_blocking() {
            tracing::error!(backend = %dev.info().backend, error = %e, "final flush failed");
        }
    }
    if let Some(pool) = pool {
        // A clean stop leaves a checkpoint: the next start replays nothing.
        if let Err(e) = pool.checkpoint_blocking() {
            tracing::error!(error = %e, "final checkpoint failed");
        }
    }
}

/// Runs [`final_stop`] if `serve` returns early with an error once the engine started.
struct StopOnError {
    engine: Option<Engine>,
    registry: Arc<Registry>,
    pool: Option<Arc<PoolHandle>>,
}

impl Drop for StopOnError {
    fn drop(&mut self) {
        if let Some(engine) = self.engine.take() {
            tracing::warn!("serve failed after the cores started: stopping them, committing");
            final_stop(engine, &self.registry, self.pool.as_ref());
        }
    }
}

/// Leaves a pointer to `socket` where the CLI looks (`locate`), if there is such a place for
/// this user; a failure is logged and serving goes on (the CLI can still be told the path).
fn publish_pointer(socket: &Path) -> Option<crate::locate::Pointer> {
    use crate::locate;
    let euid = nix::unistd::geteuid().as_raw();
    let Some(dir) = locate::publish_dir(locate::xdg_runtime_dir().as_deref(), euid) else {
        tracing::info!(
            socket = %socket.display(),
            "no pointer to the control socket: XDG_RUNTIME_DIR is not set (the CLI finds this \
             daemon from the directory holding its data dir, or with --rpc-socket)"
        );
        return None;
    };
    match locate::Pointer::publish(&dir, socket) {
        Ok(pointer) => {
            tracing::info!(
                pointer = %pointer.link().display(),
                socket = %socket.display(),
                "control socket pointer published"
            );
            Some(pointer)
        }
        Err(e) => {
            tracing::warn!(error = %e, "no pointer to the control socket");
            None
        }
    }
}

/// The embedded default: a sparse 10 GiB pool holding a 1 GiB volume `vol0`.
fn create_default_pool(path: &Path) -> anyhow::Result<()> {
    let g = PoolGeometry::standard(crate::volumes::new_uuid()?);
    PoolHandle::create(path, Some(DEFAULT_POOL_BYTES), g)
        .with_context(|| format!("creating the default pool {}", path.display()))?;
    let pool = PoolHandle::open(path)?;
    pool.create_volume("vol0", DEFAULT_VOLUME_BYTES)?;
    pool.checkpoint_blocking()?;
    tracing::info!(path = %path.display(), "created the default pool with volume vol0");
    Ok(())
}

/// A pool file other users may read holds every volume's data open to them: said at start.
fn warn_if_others_may_read(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path) {
        if m.is_file() && m.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{:o}", m.permissions().mode() & 0o777),
                "the pool file is open to other users (group or others may use it): chmod 600"
            );
        }
    }
}

fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}
