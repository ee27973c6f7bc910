//! Prometheus metrics: what the daemon has, gathered at scrape time and encoded in Prometheus'
//! text format (0.0.4) with the `prometheus-client` crate.
//!
//! Nothing here is on the data path. Each core keeps its own plain counters and histogram
//! (`ballast_engine::stats`); a scrape asks every core for a copy through its mailbox (the
//! message `ballast stats` uses), reads the pool's and the admission's counters, and encodes
//! the copies through a [`Collector`] built for that one scrape. Invariants:
//! - no metric adds work or a shared atomic per I/O: per-core counters are summed (by
//!   Prometheus, over the `core` label) only when scraped;
//! - a scrape waits at most [`CORE_REPLY_TIMEOUT`] for the cores together, and never blocks on
//!   a full mailbox (that core is counted in `ballast_scrape_cores_missing` instead);
//! - names follow Mayastor's exporter where it has one (`diskpool_*`), else `ballast_*`;
//!   counters get `_total` from the encoder.

use std::fmt;
use std::time::{Duration, Instant};

use ballast_engine::limits::ConnCounters;
use ballast_engine::reactor::CoreHandle;
use ballast_engine::stats::{StatsSnapshot, LATENCY_BUCKET_BOUNDS_US};
use ballast_engine::volume::dev::{PoolInfo, VolumeInfo};
use ballast_engine::Msg;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::control::Control;

/// The longest a scrape (or `ballast stats`) waits for the cores' copies, all cores together.
pub const CORE_REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// Asks every core for a copy of its statistics and collects the replies (in core order);
/// cores that do not answer within [`CORE_REPLY_TIMEOUT`] (or whose mailbox is full, when
/// `wait_for_room` is false) are left out.
pub fn core_snapshots(cores: &[CoreHandle], wait_for_room: bool) -> Vec<StatsSnapshot> {
    let mut pending = Vec::with_capacity(cores.len());
    for core in cores {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let sent = if wait_for_room {
            core.send_blocking(Msg::Stats(tx))
        } else {
            core.send(Msg::Stats(tx)).is_ok()
        };
        if sent {
            pending.push(rx);
        }
    }
    let deadline = Instant::now() + CORE_REPLY_TIMEOUT;
    let mut out: Vec<StatsSnapshot> =
        pending.iter().filter_map(|rx| rx.recv_deadline(deadline).ok()).collect();
    out.sort_by_key(|s| s.core);
    out
}

/// One export, as the metrics show it.
#[derive(Debug)]
pub struct ExportView {
    pub name: String,
    pub backend: String,
    pub size_bytes: u64,
    pub read_only: bool,
    /// Its device's counters in the cores' statistics (`DevInfo::stats_id`).
    pub stats_id: u32,
    /// Requests its rate limits held back, and the µs they waited in all (`Qos::delayed`).
    pub qos_delayed: u64,
    pub qos_delayed_us: u64,
    /// Times connections stopped taking its requests while its waiting I/O held its share of
    /// a core's memory (`Qos::paused`).
    pub qos_paused: u64,
}

/// Everything one scrape reports, copied out of the daemon.
#[derive(Debug)]
pub struct Scrape {
    /// This machine's name (Mayastor's `node` label).
    pub node: String,
    pub cores_configured: usize,
    pub cores: Vec<StatsSnapshot>,
    pub connections: ConnCounters,
    pub max_connections: u64,
    pub buffer_memory: u64,
    pub pool: Option<(PoolInfo, Vec<VolumeInfo>)>,
    pub exports: Vec<ExportView>,
    pub nvmf_subsystems: usize,
    /// How long gathering took (the cores' replies, mostly).
    pub gather_seconds: f64,
}

/// Copies what the metrics report out of the running daemon.
pub fn gather(control: &Control, node: &str) -> Scrape {
    let started = Instant::now();
    let cores = core_snapshots(&control.cores, false);
    let pool = control.pool.as_ref().map(|p| (p.info(), p.list()));
    let exports = control
        .registry
        .list()
        .iter()
        .map(|e| ExportView {
            name: e.name.clone(),
            backend: e.dev.info().backend.clone(),
            size_bytes: e.size_bytes(),
            read_only: e.read_only,
            stats_id: e.stats_id,
            qos_delayed: e.qos.delayed().0,
            qos_delayed_us: e.qos.delayed().1.as_micros() as u64,
            qos_paused: e.qos.paused(),
        })
        .collect();
    Scrape {
        node: node.to_string(),
        cores_configured: control.cores.len(),
        cores,
        connections: control.admission.counters(),
        max_connections: control.admission.limits.max_connections,
        buffer_memory: control.buffer_memory,
        pool,
        exports,
        nvmf_subsystems: control.target.subsystems().len(),
        gather_seconds: started.elapsed().as_secs_f64(),
    }
}

/// This machine's host name, for the `node` label.
pub fn node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// The scrape in Prometheus' text format.
pub fn encode(scrape: Scrape) -> Result<String, fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ScrapeCollector(scrape)));
    let mut text = String::with_capacity(16 << 10);
    prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)?;
    Ok(text)
}

/// The `Content-Type` of [`encode`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

type Labels = Vec<(&'static str, String)>;

/// A per-core metric: name, help, type, and where its value is in a core's snapshot.
type PerCoreMetric = (&'static str, &'static str, MetricType, fn(&StatsSnapshot) -> u64);

#[derive(Debug)]
struct ScrapeCollector(Scrape);

/// One metric family: its descriptor, then one sample per label set.
fn family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Labels, u64)>,
) -> fmt::Result {
    let mut metric = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        let sample = metric.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(value).encode(sample)?,
            _ => ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(sample)?,
        }
    }
    Ok(())
}

fn core_label(s: &StatsSnapshot) -> Labels {
    vec![("core", s.core.to_string())]
}

fn labelled(s: &StatsSnapshot, key: &'static str, value: &str) -> Labels {
    vec![("core", s.core.to_string()), (key, value.to_string())]
}

impl Collector for ScrapeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        self.encode_cores(&mut enc)?;
        self.encode_limits(&mut enc)?;
        self.encode_pool(&mut enc)?;
        self.encode_exports(&mut enc)
    }
}

impl ScrapeCollector {
    /// Per-core I/O counters, latency histograms, loop counters and payload memory.
    fn encode_cores(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        use MetricType::{Counter, Gauge};
        let cores = &self.0.cores;
        let ops = cores.iter().flat_map(|s| {
            [
                ("read", s.reads),
                ("write", s.writes),
                ("flush", s.flushes),
                ("trim", s.discards),
                ("write_zeroes", s.write_zeroes),
                ("other", s.other),
            ]
            .map(|(op, n)| (labelled(s, "op", op), n))
        });
        family(enc, "ballast_core_ops", "Requests completed, by core and kind.", Counter, ops)?;
        let bytes = cores.iter().flat_map(|s| {
            [("read", s.bytes_read), ("write", s.bytes_written)]
                .map(|(op, n)| (labelled(s, "op", op), n))
        });
        family(enc, "ballast_core_bytes", "Payload bytes read and written.", Counter, bytes)?;
        let errors = cores.iter().map(|s| (core_label(s), s.errors));
        family(enc, "ballast_core_errors", "Requests completed with an error.", Counter, errors)?;
        self.encode_latency(enc)?;
        let per_core: [PerCoreMetric; 35] = [
            ("ballast_core_queue_depth", "Requests taken in and not completed yet.", Gauge, |s| {
                s.in_flight
            }),
            ("ballast_core_ring_enters", "System calls into the core's io_uring.", Counter, |s| {
                s.ring_enters
            }),
            ("ballast_core_ring_ops", "Operations queued on the core's io_uring.", Counter, |s| {
                s.ring_ops
            }),
            ("ballast_core_sends", "Socket sends (each a sendmsg of a batch).", Counter, |s| {
                s.sends
            }),
            ("ballast_core_recvs", "Socket receives.", Counter, |s| s.recvs),
            (
                "ballast_core_allocations",
                "Heap allocations made on the core's thread (the per-I/O path makes none).",
                Counter,
                |s| s.allocations,
            ),
            (
                "ballast_core_fixed_file_ops",
                "Device operations naming a file registered with the core's ring.",
                Counter,
                |s| s.fixed_file_ops,
            ),
            (
                "ballast_core_fixed_buf_ops",
                "Device operations on a buffer registered with the core's ring.",
                Counter,
                |s| s.fixed_buf_ops,
            ),
            (
                "ballast_core_short_transfers",
                "Reads and writes the kernel did in part, submitted again for the rest.",
                Counter,
                |s| s.short_transfers,
            ),
            (
                "ballast_core_registration_failures",
                "Registrations of files or buffers the kernel refused (the table is then given up).",
                Counter,
                |s| s.registration_failures,
            ),
            ("ballast_core_files_registered", "Files the core's ring holds registered.", Gauge, |s| {
                s.files_registered
            }),
            ("ballast_core_bufs_registered", "Buffers the core's ring holds registered.", Gauge, |s| {
                s.bufs_registered
            }),
            ("ballast_core_connections_open", "Connections served by the core.", Gauge, |s| {
                s.connections_open
            }),
            ("ballast_core_connections_accepted", "Connections the core took.", Counter, |s| {
                s.connections_total
            }),
            (
                "ballast_core_connections_moved",
                "Connections the core sent on to the core their volume lives on.",
                Counter,
                |s| s.connections_moved,
            ),
            ("ballast_core_tasks", "Tasks (connections, listeners, volume I/O).", Gauge, |s| {
                s.tasks
            }),
            ("ballast_core_loops_busy", "Reactor turns that found work.", Counter, |s| {
                s.loops_busy
            }),
            ("ballast_core_spins", "Idle turns that polled instead of sleeping.", Counter, |s| {
                s.spins
            }),
            ("ballast_core_sleeps", "Times the core slept in its ring.", Counter, |s| s.sleeps),
            (
                "ballast_core_offloaded",
                "CPU-heavy jobs (TLS handshake steps) handed to offload threads.",
                Counter,
                |s| s.offloaded,
            ),
            (
                "ballast_core_offload_in_place",
                "CPU-heavy jobs run on the core: no offload thread could take them.",
                Counter,
                |s| s.offload_in_place,
            ),
            (
                "ballast_core_reads_lent",
                "Reads sent straight from a RAM export's memory (no I/O, no copy of ours).",
                Counter,
                |s| s.reads_lent,
            ),
            (
                "ballast_core_writes_now",
                "Writes stored straight from a receive buffer into a RAM export (no I/O, no buffer).",
                Counter,
                |s| s.writes_now,
            ),
            (
                "ballast_core_writes_fenced",
                "Writes that waited while an NVMe fused Compare and Write ran alone on their device.",
                Counter,
                |s| s.writes_fenced,
            ),
            (
                "ballast_core_volume_rounds",
                "Borrows of a pool's shared state by the core's volume requests (one per flush round).",
                Counter,
                |s| s.volume_rounds,
            ),
            (
                "ballast_core_volume_events",
                "Volume request events decided in those borrows.",
                Counter,
                |s| s.volume_events,
            ),
            (
                "ballast_core_volume_forwarded",
                "Volume requests the core forwarded to the core owning their family.",
                Counter,
                |s| s.volume_forwarded,
            ),
            (
                "ballast_core_volume_mail_wakes",
                "Wake-ups the core sent with forwarded requests or their answers (one per batch at most).",
                Counter,
                |s| s.volume_mail_wakes,
            ),
            ("ballast_buffer_budget_bytes", "The core's payload-memory budget.", Gauge, |s| {
                s.buffers.buffer_budget
            }),
            ("ballast_buffer_charged_bytes", "Payload memory charged now.", Gauge, |s| {
                s.buffers.buffer_charged
            }),
            ("ballast_buffer_peak_bytes", "Most payload memory ever charged.", Gauge, |s| {
                s.buffers.buffer_peak
            }),
            ("ballast_buffer_cached_bytes", "Free buffers kept for reuse.", Gauge, |s| {
                s.buffers.buffer_cached
            }),
            ("ballast_buffer_refusals", "Charges the full budget refused.", Counter, |s| {
                s.buffers.buffer_refusals
            }),
            ("ballast_buffer_waiters", "Holders waiting for payload memory.", Gauge, |s| {
                s.buffers.buffer_waiters
            }),
            (
                "ballast_buffer_qos_waiting_bytes",
                "Payload memory held by requests waiting for their export's rate limits.",
                Gauge,
                |s| s.buffers.buffer_qos_waiting,
            ),
        ];
        for (name, help, kind, get) in per_core {
            family(enc, name, help, kind, cores.iter().map(|s| (core_label(s), get(s))))?;
        }
        Ok(())
    }

    /// Each core's service-latency histogram, in seconds (Prometheus' base unit).
    fn encode_latency(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        let mut metric = enc.encode_descriptor(
            "ballast_core_request_latency_seconds",
            "Time from a request's arrival to its reply, all kinds of request.",
            None,
            MetricType::Histogram,
        )?;
        for s in &self.0.cores {
            let labels = core_label(s);
            let mut previous = 0;
            let buckets: Vec<(f64, u64)> = LATENCY_BUCKET_BOUNDS_US
                .iter()
                .zip(s.latency.cumulative)
                .map(|(&bound_us, cumulative)| {
                    // The encoder accumulates: hand it each bucket's own count.
                    let own = cumulative - previous;
                    previous = cumulative;
                    (bound_us as f64 / 1e6, own)
                })
                .collect();
            let sum_seconds = s.latency.sum_ns as f64 / 1e9;
            encode_histogram(
                metric.encode_family(&labels)?,
                sum_seconds,
                s.latency.count,
                &buckets,
            )?;
        }
        Ok(())
    }

    /// Connection limits and what they did; payload-memory limit; scrape health.
    fn encode_limits(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        use MetricType::{Counter, Gauge};
        let s = &self.0;
        let c = &s.connections;
        let one = |v: u64| [(Labels::new(), v)];
        family(
            enc,
            "ballast_connections_open",
            "Connections open, all protocols.",
            Gauge,
            one(c.open),
        )?;
        family(
            enc,
            "ballast_connections_max",
            "--max-connections.",
            Gauge,
            one(s.max_connections),
        )?;
        family(
            enc,
            "ballast_connections_refused",
            "Connections refused at the limit.",
            Counter,
            one(c.refused),
        )?;
        family(
            enc,
            "ballast_connections_handshake_timeouts",
            "Connections dropped for a handshake past --handshake-timeout.",
            Counter,
            one(c.handshake_timeouts),
        )?;
        family(
            enc,
            "ballast_connections_stalled",
            "Connections dropped for owing progress past --stall-timeout.",
            Counter,
            one(c.stalled_dropped),
        )?;
        family(
            enc,
            "ballast_buffer_memory_limit_bytes",
            "--buffer-memory: payload memory of all cores together.",
            Gauge,
            one(s.buffer_memory),
        )?;
        family(enc, "ballast_cores", "Data cores running.", Gauge, one(s.cores_configured as u64))?;
        let missing = s.cores_configured.saturating_sub(s.cores.len()) as u64;
        family(
            enc,
            "ballast_scrape_cores_missing",
            "Cores whose statistics did not arrive in time for this scrape.",
            Gauge,
            one(missing),
        )?;
        let metric = enc.encode_descriptor(
            "ballast_scrape_gather_seconds",
            "Time this scrape took to gather the statistics.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(s.gather_seconds).encode(metric)
    }

    /// The pool (Mayastor's `diskpool_*` names) and its volumes (`volume_*`).
    fn encode_pool(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        use MetricType::Gauge;
        let Some((info, volumes)) = &self.0.pool else {
            return Ok(());
        };
        let pool = || vec![("node", self.0.node.clone()), ("name", info.path.clone())];
        let committed: u64 = volumes.iter().filter(|v| !v.snapshot).map(|v| v.size_bytes).sum();
        let pool_gauges = [
            (
                "diskpool_status",
                "Pool status: 1 online (a pool that fails to open stops serve).",
                1,
            ),
            ("diskpool_total_size_bytes", "Bytes for data in the pool.", info.data_bytes),
            ("diskpool_used_size_bytes", "Bytes of data clusters in use.", info.used_bytes),
            (
                "diskpool_committed_size_bytes",
                "Sum of the sizes of the pool's volumes and clones (thin: may pass the total).",
                committed,
            ),
            ("ballast_pool_free_bytes", "Bytes of free data clusters.", info.free_bytes),
            ("ballast_pool_metadata_bytes", "Bytes reserved for checkpoints.", info.metadata_bytes),
            ("ballast_pool_journal_bytes", "Bytes of the metadata journal.", info.journal_bytes),
            ("ballast_pool_cluster_bytes", "Allocation unit.", info.cluster_bytes),
            ("ballast_pool_volumes", "Volumes, snapshots and clones.", info.volumes as u64),
            (
                "ballast_pool_journal_free_bytes",
                "Journal ring bytes free.",
                info.journal_free_bytes,
            ),
            (
                "ballast_pool_pending_records",
                "Mapping records not yet committed.",
                info.pending_records,
            ),
            ("ballast_pool_open_milliseconds", "How long opening (recovery) took.", info.open_ms),
            (
                "ballast_pool_copy_rate_bytes_per_second",
                "The pace of decoupling and inflating, all together (0: unpaced).",
                info.copy_rate_bytes_per_sec,
            ),
            (
                "ballast_pool_decouples_running",
                "Decouplings and inflations of volumes running.",
                info.decouples_running,
            ),
        ];
        for (name, help, value) in pool_gauges {
            family(enc, name, help, Gauge, [(pool(), value)])?;
        }
        let counters = [
            (
                "ballast_pool_commits",
                "Journal commits made durable since the pool opened.",
                info.commits,
            ),
            (
                "ballast_pool_checkpoints",
                "Checkpoints written since the pool opened.",
                info.checkpoints,
            ),
            (
                "ballast_pool_copied_bytes",
                "Bytes decoupling and inflating copied since the pool opened.",
                info.copied_bytes,
            ),
        ];
        for (name, help, value) in counters {
            family(enc, name, help, MetricType::Counter, [(pool(), value)])?;
        }
        let volume = |v: &VolumeInfo| {
            let kind = if v.snapshot {
                "snapshot"
            } else if v.parent.is_some() {
                "clone"
            } else {
                "volume"
            };
            vec![("name", v.name.clone()), ("kind", kind.to_string())]
        };
        let sizes = volumes.iter().map(|v| (volume(v), v.size_bytes));
        family(enc, "volume_size_bytes", "A volume's size.", Gauge, sizes)?;
        let allocated = volumes.iter().map(|v| (volume(v), v.allocated_bytes));
        family(
            enc,
            "volume_allocated_bytes",
            "Bytes a volume has allocated in the pool.",
            Gauge,
            allocated,
        )
    }

    /// Exports (NBD names; volumes included) and NVMe-oF subsystems.
    fn encode_exports(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        use MetricType::Gauge;
        let exports = self.0.exports.iter().map(|e| {
            let labels = vec![
                ("export", e.name.clone()),
                ("backend", e.backend.clone()),
                ("read_only", e.read_only.to_string()),
            ];
            (labels, e.size_bytes)
        });
        family(enc, "ballast_export_size_bytes", "An export's size.", Gauge, exports)?;
        self.encode_export_io(enc)?;
        let subsystems = [(Labels::new(), self.0.nvmf_subsystems as u64)];
        family(enc, "ballast_nvmf_subsystems", "NVMe-oF subsystems.", Gauge, subsystems)
    }
}

impl ScrapeCollector {
    /// Each export's requests per protocol (`protocol`: `nbd`, `nvmf`; both always listed),
    /// its device's counters summed over the cores at scrape time.
    fn encode_export_io(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        use ballast_engine::stats::{DevCounters, Proto};
        use MetricType::Counter;
        let mut sums: std::collections::HashMap<(u32, Proto), DevCounters> = Default::default();
        for s in &self.0.cores {
            for (id, proto, d) in &s.devices {
                sums.entry((*id, *proto)).or_default().merge(d);
            }
        }
        let views: Vec<(&ExportView, Proto, DevCounters)> = self
            .0
            .exports
            .iter()
            .flat_map(|e| Proto::ALL.map(|p| (e, p)))
            .map(|(e, p)| (e, p, sums.get(&(e.stats_id, p)).copied().unwrap_or_default()))
            .collect();
        let io = |e: &ExportView, p: Proto| {
            vec![("export", e.name.clone()), ("protocol", p.label().to_string())]
        };
        let label = |e: &ExportView, p: Proto, k: &'static str, v: &str| {
            let mut l = io(e, p);
            l.push((k, v.to_string()));
            l
        };
        let ops = views.iter().flat_map(|(e, p, d)| {
            [
                ("read", d.reads),
                ("write", d.writes),
                ("flush", d.flushes),
                ("trim", d.discards),
                ("write_zeroes", d.write_zeroes),
                ("other", d.other),
            ]
            .map(|(op, n)| (label(e, *p, "op", op), n))
        });
        family(
            enc,
            "ballast_export_ops",
            "Requests completed on an export, by kind.",
            Counter,
            ops,
        )?;
        let bytes = views.iter().flat_map(|(e, p, d)| {
            [("read", d.bytes_read), ("write", d.bytes_written)]
                .map(|(op, n)| (label(e, *p, "op", op), n))
        });
        family(
            enc,
            "ballast_export_bytes",
            "Payload bytes read and written on an export.",
            Counter,
            bytes,
        )?;
        let errors = views.iter().map(|(e, p, d)| (io(e, *p), d.errors));
        family(
            enc,
            "ballast_export_errors",
            "Requests on an export completed with an error.",
            Counter,
            errors,
        )?;
        let depth = views.iter().map(|(e, p, d)| (io(e, *p), d.in_flight));
        family(
            enc,
            "ballast_export_queue_depth",
            "Requests on an export taken in and not completed yet, all cores.",
            MetricType::Gauge,
            depth,
        )?;
        let latency = views.iter().map(|(e, p, d)| (io(e, *p), d.latency_ns_sum / 1000));
        family(
            enc,
            "ballast_export_latency_microseconds",
            "Sum of an export's request latencies (divide by its ops for the average).",
            Counter,
            latency,
        )?;
        // Rate limits are the export's, whatever protocol its requests came by.
        let exports = &self.0.exports;
        let delayed = exports.iter().map(|e| (vec![("export", e.name.clone())], e.qos_delayed));
        family(
            enc,
            "ballast_export_qos_delayed",
            "Requests an export's rate limits held back until their slot.",
            Counter,
            delayed,
        )?;
        let waited = exports.iter().map(|e| (vec![("export", e.name.clone())], e.qos_delayed_us));
        family(
            enc,
            "ballast_export_qos_delayed_microseconds",
            "Time the requests an export's rate limits held back waited, in all.",
            Counter,
            waited,
        )?;
        let paused = exports.iter().map(|e| (vec![("export", e.name.clone())], e.qos_paused));
        family(
            enc,
            "ballast_export_qos_paused",
            "Times connections stopped reading an export's requests: its requests waiting for \
             its rate limits held their share of a core's payload memory (--qos-wait-memory).",
            Counter,
            paused,
        )
    }
}

fn encode_histogram(
    mut sample: MetricEncoder,
    sum: f64,
    count: u64,
    buckets: &[(f64, u64)],
) -> fmt::Result {
    sample.encode_histogram::<Labels>(sum, count, buckets, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballast_engine::stats::{CoreStats, OpKind, Proto};

    fn scrape() -> Scrape {
        let mut a = CoreStats::new(0);
        a.record(7, Proto::Nvmf, OpKind::Read, 4096, 30_000, true);
        a.record(7, Proto::Nvmf, OpKind::Read, 4096, 30_000, true);
        a.record(7, Proto::Nbd, OpKind::Write, 8192, 2_000_000, false);
        a.submitted(7, Proto::Nvmf);
        let mut b = CoreStats::new(1);
        b.submitted(7, Proto::Nbd);
        b.submitted(7, Proto::Nbd);
        let pool = PoolInfo {
            path: "/p.img".into(),
            uuid: "00".into(),
            cluster_bytes: 65536,
            data_bytes: 1 << 30,
            free_bytes: (1 << 30) - (1 << 20),
            used_bytes: 1 << 20,
            metadata_bytes: 4 << 20,
            journal_bytes: 8 << 20,
            volumes: 2,
            journal_free_bytes: 6 << 20,
            pending_records: 3,
            commits: 12,
            checkpoints: 1,
            open_ms: 40,
            placement: Default::default(),
            families_per_core: vec![0, 0],
            copy_rate_bytes_per_sec: 256 << 20,
            decouples_running: 1,
            copied_bytes: 5 << 20,
        };
        let vol = |name: &str, snapshot: bool| VolumeInfo {
            id: 1,
            name: name.into(),
            size_bytes: 1 << 29,
            allocated_bytes: 1 << 20,
            read_only: snapshot,
            snapshot,
            thick: false,
            parent: None,
        };
        Scrape {
            node: "host".into(),
            cores_configured: 3,
            cores: vec![a.snapshot(), b.snapshot()],
            connections: ConnCounters { open: 2, refused: 5, ..Default::default() },
            max_connections: 4096,
            buffer_memory: 256 << 20,
            pool: Some((pool, vec![vol("v0", false), vol("s0", true)])),
            exports: vec![ExportView {
                name: "v0".into(),
                backend: "volume".into(),
                size_bytes: 1 << 29,
                read_only: false,
                stats_id: 7,
                qos_delayed: 3,
                qos_delayed_us: 4500,
                qos_paused: 6,
            }],
            nvmf_subsystems: 1,
            gather_seconds: 0.001,
        }
    }

    #[test]
    fn encodes_counters_histograms_and_pool_gauges() {
        let text = encode(scrape()).unwrap();
        for line in [
            r#"ballast_core_ops_total{core="0",op="read"} 2"#,
            r#"ballast_core_ops_total{core="0",op="write"} 1"#,
            r#"ballast_core_ops_total{core="1",op="read"} 0"#,
            r#"ballast_core_bytes_total{core="0",op="write"} 8192"#,
            r#"ballast_core_errors_total{core="0"} 1"#,
            r#"ballast_core_request_latency_seconds_bucket{core="0",le="2.5e-05"} 0"#,
            r#"ballast_core_request_latency_seconds_bucket{core="0",le="5e-05"} 2"#,
            r#"ballast_core_request_latency_seconds_bucket{core="0",le="0.0025"} 3"#,
            r#"ballast_core_request_latency_seconds_bucket{core="0",le="+Inf"} 3"#,
            r#"ballast_core_request_latency_seconds_count{core="0"} 3"#,
            r#"ballast_connections_refused_total 5"#,
            r#"ballast_scrape_cores_missing 1"#,
            r#"diskpool_used_size_bytes{node="host",name="/p.img"} 1048576"#,
            r#"diskpool_committed_size_bytes{node="host",name="/p.img"} 536870912"#,
            r#"volume_allocated_bytes{name="s0",kind="snapshot"} 1048576"#,
            r#"ballast_export_size_bytes{export="v0",backend="volume",read_only="false"} 536870912"#,
            r#"ballast_pool_commits_total{node="host",name="/p.img"} 12"#,
            r#"ballast_pool_pending_records{node="host",name="/p.img"} 3"#,
            r#"ballast_pool_copy_rate_bytes_per_second{node="host",name="/p.img"} 268435456"#,
            r#"ballast_pool_decouples_running{node="host",name="/p.img"} 1"#,
            r#"ballast_pool_copied_bytes_total{node="host",name="/p.img"} 5242880"#,
            r#"ballast_export_ops_total{export="v0",protocol="nvmf",op="read"} 2"#,
            r#"ballast_export_ops_total{export="v0",protocol="nvmf",op="write"} 0"#,
            r#"ballast_export_ops_total{export="v0",protocol="nbd",op="write"} 1"#,
            r#"ballast_export_ops_total{export="v0",protocol="nbd",op="read"} 0"#,
            r#"ballast_export_bytes_total{export="v0",protocol="nbd",op="write"} 8192"#,
            r#"ballast_export_bytes_total{export="v0",protocol="nvmf",op="read"} 8192"#,
            r#"ballast_export_errors_total{export="v0",protocol="nbd"} 1"#,
            r#"ballast_export_errors_total{export="v0",protocol="nvmf"} 0"#,
            r#"ballast_export_latency_microseconds_total{export="v0",protocol="nvmf"} 60"#,
            r#"ballast_export_latency_microseconds_total{export="v0",protocol="nbd"} 2000"#,
            r#"ballast_export_queue_depth{export="v0",protocol="nvmf"} 1"#,
            r#"ballast_export_queue_depth{export="v0",protocol="nbd"} 2"#,
            r#"ballast_export_qos_delayed_total{export="v0"} 3"#,
            r#"ballast_export_qos_delayed_microseconds_total{export="v0"} 4500"#,
            r#"ballast_export_qos_paused_total{export="v0"} 6"#,
            r#"ballast_core_queue_depth{core="0"} 1"#,
            r#"ballast_core_queue_depth{core="1"} 2"#,
            "# TYPE ballast_core_request_latency_seconds histogram",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        let sum = text
            .lines()
            .find(|l| l.starts_with(r#"ballast_core_request_latency_seconds_sum{core="0"}"#))
            .unwrap();
        let seconds: f64 = sum.rsplit(' ').next().unwrap().parse().unwrap();
        assert!((seconds - 0.00206).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn every_sample_line_is_well_formed() {
        let text = encode(scrape()).unwrap();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok() || value == "+Inf", "{line}");
            assert!(name.chars().next().unwrap().is_ascii_lowercase(), "{line}");
        }
    }

    #[test]
    fn no_pool_no_pool_metrics() {
        let mut s = scrape();
        s.pool = None;
        let text = encode(s).unwrap();
        assert!(!text.contains("diskpool_"));
        assert!(text.contains("ballast_core_ops_total"));
    }
}
