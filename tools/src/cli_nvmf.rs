//! `ballast nvmf ...`: the NVMe-oF commands of the CLI, a thin client of the `nvmf_*` methods
//! (SPDK's names and parameters, the param and result types of [`crate::rpc_nvmf`]).
//!
//! Every command prints for people by default (aligned tables for listings, one line saying
//! what was done otherwise) and the method's JSON result with `--json`.

use std::net::SocketAddr;

use clap::{Args, Subcommand};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::client::{self, Align};
use crate::rpc_nvmf::{
    AddListener, AddNs, CreateSubsystem, GetSubsystems, Host, ListenAddress, ListenEntry,
    ListenerEntry, Nqn, NsParams, NsRef, ReservationView, SecureChannelParam, SetAnaState,
    SubsystemEntry,
};

/// Where a command goes and how it prints.
#[derive(Args)]
pub struct Out {
    #[command(flatten)]
    target: client::Target,
    /// Print the method's JSON result instead of text for people.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
pub enum NvmfCommand {
    /// List subsystems with their namespaces, hosts and listeners (one line per namespace).
    List {
        #[command(flatten)]
        out: Out,
    },
    /// Create a subsystem (NQN, or a short name made into nqn.2026-11.dev.ballast:NAME). It
    /// listens nowhere until add-listener.
    Create {
        nqn: String,
        /// Let any host connect (otherwise only hosts added with add-host).
        #[arg(long)]
        allow_any_host: bool,
        /// Serial number in Identify Controller (≤ 20 ASCII characters; default: from the NQN).
        #[arg(short = 's', long)]
        serial_number: Option<String>,
        /// Model number in Identify Controller (≤ 40 ASCII characters; default: ballast).
        #[arg(short = 'd', long)]
        model_number: Option<String>,
        #[command(flatten)]
        out: Out,
    },
    /// Delete a subsystem; its controllers are torn down.
    Delete {
        nqn: String,
        #[command(flatten)]
        out: Out,
    },
    /// Add an export's device as a namespace.
    AddNs {
        nqn: String,
        /// Export (bdev) name.
        bdev: String,
        #[arg(long, default_value_t = 0)]
        nsid: u32,
        /// LBA size: 512 or 4096.
        #[arg(long, default_value_t = 4096)]
        block_size: u32,
        #[command(flatten)]
        out: Out,
    },
    /// Allow a host NQN (with --psk: only over TLS with that key; with --dhchap-key: only
    /// after DH-HMAC-CHAP in-band authentication).
    AddHost {
        nqn: String,
        host: String,
        /// The keyring name of the host's TLS PSK (`ballast rpc keyring_file_add_key`).
        #[arg(long)]
        psk: Option<String>,
        /// The keyring name of the host's DH-HMAC-CHAP secret (`DHHC-1:xx:...:`).
        #[arg(long)]
        dhchap_key: Option<String>,
        /// The keyring name of the controller's secret (bidirectional authentication).
        #[arg(long, requires = "dhchap_key")]
        dhchap_ctrlr_key: Option<String>,
        /// Hashes this host may use, preferred first (sha256,sha384,sha512).
        #[arg(long, value_delimiter = ',', requires = "dhchap_key")]
        dhchap_digests: Option<Vec<String>>,
        /// DH groups this host may use, preferred first (null,ffdhe2048,...,ffdhe8192).
        #[arg(long, value_delimiter = ',', requires = "dhchap_key")]
        dhchap_dhgroups: Option<Vec<String>>,
        #[command(flatten)]
        out: Out,
    },
    /// Disallow a host NQN.
    RemoveHost {
        nqn: String,
        host: String,
        #[command(flatten)]
        out: Out,
    },
    /// Let hosts reach the subsystem through ADDRESS:PORT (TCP; bound if new).
    AddListener {
        nqn: String,
        /// ADDRESS:PORT
        address: SocketAddr,
        /// What the listener asks of hosts: none (plaintext), optional (TLS 1.3 or
        /// plaintext), required (TLS 1.3 only).
        #[arg(long, value_enum, default_value = "none")]
        secure_channel: crate::serve::SecureChannelArg,
        #[command(flatten)]
        out: Out,
    },
    /// Stop the subsystem listening on ADDRESS:PORT (its controllers there are torn down).
    RemoveListener {
        nqn: String,
        /// ADDRESS:PORT
        address: SocketAddr,
        #[command(flatten)]
        out: Out,
    },
    /// The addresses a subsystem listens on, with each ANA group's state there.
    Listeners {
        nqn: String,
        #[command(flatten)]
        out: Out,
    },
    /// A namespace's NVMe reservation: its type, generation, PTPL, and the registered hosts
    /// (identifier, the host NQNs connected with it now, whether it holds it); never the keys.
    Reservation {
        nqn: String,
        /// The namespace id.
        #[arg(long, default_value_t = 1)]
        nsid: u32,
        #[command(flatten)]
        out: Out,
    },
    /// Set the ANA state of the subsystem's namespaces through ADDRESS:PORT: hosts using
    /// native multipath move their I/O to the paths that serve it.
    AnaState {
        nqn: String,
        /// ADDRESS:PORT
        address: SocketAddr,
        /// optimized, non_optimized, inaccessible or persistent_loss.
        state: String,
        /// Only this ANA group (a namespace's group is its id unless given); default: all.
        #[arg(long)]
        group: Option<u32>,
        #[command(flatten)]
        out: Out,
    },
}

/// `nqn.…` as given; a short name under ballast's prefix.
fn full_nqn(nqn: &str) -> String {
    if nqn.starts_with("nqn.") {
        nqn.to_string()
    } else {
        format!("{}{nqn}", ballast_nvmf::NQN_PREFIX)
    }
}

fn listen_address(address: SocketAddr) -> ListenAddress {
    ListenAddress {
        trtype: "tcp".into(),
        adrfam: Some(if address.is_ipv6() { "ipv6" } else { "ipv4" }.into()),
        traddr: address.ip().to_string(),
        trsvcid: Some(address.port().to_string()),
    }
}

fn address(l: &ListenEntry) -> String {
    if l.adrfam.eq_ignore_ascii_case("ipv6") {
        format!("[{}]:{}", l.traddr, l.trsvcid)
    } else {
        format!("{}:{}", l.traddr, l.trsvcid)
    }
}

/// Calls `method`; prints its result as JSON, or `said(result)` for people.
fn act<P: Serialize, R: Serialize + DeserializeOwned>(
    out: &Out,
    method: &str,
    params: &P,
    said: impl FnOnce(&R) -> String,
) -> anyhow::Result<()> {
    let result: R = client::call(&out.target, method, params)?;
    if out.json {
        return client::print_json(&result);
    }
    println!("{}", said(&result));
    Ok(())
}

pub fn run(cmd: NvmfCommand) -> anyhow::Result<()> {
    match cmd {
        NvmfCommand::List { out } => {
            let list: Vec<SubsystemEntry> =
                client::call(&out.target, "nvmf_get_subsystems", &GetSubsystems::default())?;
            print_subsystems(&list, out.json)
        }
        NvmfCommand::Create { nqn, allow_any_host, serial_number, model_number, out } => {
            let nqn = full_nqn(&nqn);
            let params = CreateSubsystem {
                nqn: nqn.clone(),
                allow_any_host,
                serial_number,
                model_number,
                ..Default::default()
            };
            act(&out, "nvmf_create_subsystem", &params, |_: &bool| {
                format!("created subsystem {nqn} (no listener yet: add-listener)")
            })
        }
        NvmfCommand::Delete { nqn, out } => {
            let nqn = full_nqn(&nqn);
            let params = Nqn { nqn: nqn.clone(), tgt_name: None };
            act(&out, "nvmf_delete_subsystem", &params, |_: &bool| {
                format!("deleted subsystem {nqn}")
            })
        }
        NvmfCommand::AddNs { nqn, bdev, nsid, block_size, out } => {
            let nqn = full_nqn(&nqn);
            let namespace = NsParams {
                bdev_name: bdev.clone(),
                nsid,
                block_size: Some(block_size),
                ..Default::default()
            };
            let params = AddNs { nqn: nqn.clone(), namespace, tgt_name: None };
            act(&out, "nvmf_subsystem_add_ns", &params, |nsid: &u32| {
                format!("added {bdev} to {nqn} as namespace {nsid}")
            })
        }
        NvmfCommand::AddHost {
            nqn,
            host,
            psk,
            dhchap_key,
            dhchap_ctrlr_key,
            dhchap_digests,
            dhchap_dhgroups,
            out,
        } => {
            let nqn = full_nqn(&nqn);
            let params = Host {
                nqn: nqn.clone(),
                host: host.clone(),
                psk,
                dhchap_key,
                dhchap_ctrlr_key,
                dhchap_digests,
                dhchap_dhgroups,
                tgt_name: None,
            };
            act(&out, "nvmf_subsystem_add_host", &params, |_: &bool| {
                format!("allowed {host} on {nqn}")
            })
        }
        NvmfCommand::RemoveHost { nqn, host, out } => {
            let nqn = full_nqn(&nqn);
            let params = Host { nqn: nqn.clone(), host: host.clone(), ..Default::default() };
            act(&out, "nvmf_subsystem_remove_host", &params, |_: &bool| {
                format!("disallowed {host} on {nqn}")
            })
        }
        NvmfCommand::AddListener { nqn, address, secure_channel, out } => {
            let nqn = full_nqn(&nqn);
            let listen_address = listen_address(address);
            let mode = ballast_nvmf::tls::SecureChannel::from(secure_channel);
            let params = AddListener {
                nqn: nqn.clone(),
                listen_address,
                secure_channel: SecureChannelParam::Mode(mode),
                ..Default::default()
            };
            act(&out, "nvmf_subsystem_add_listener", &params, |_: &bool| {
                format!("{nqn} listens on {address}")
            })
        }
        NvmfCommand::RemoveListener { nqn, address, out } => {
            let nqn = full_nqn(&nqn);
            let listen_address = listen_address(address);
            let params = AddListener { nqn: nqn.clone(), listen_address, ..Default::default() };
            act(&out, "nvmf_subsystem_remove_listener", &params, |_: &bool| {
                format!("{nqn} no longer listens on {address}")
            })
        }
        NvmfCommand::Listeners { nqn, out } => {
            let params = Nqn { nqn: full_nqn(&nqn), tgt_name: None };
            let list: Vec<ListenerEntry> =
                client::call(&out.target, "nvmf_subsystem_get_listeners", &params)?;
            if out.json {
                return client::print_json(&list);
            }
            let rows = list
                .iter()
                .map(|l| {
                    let secure = serde_json::to_value(l.secure_channel_mode)
                        .ok()
                        .and_then(|v| v.as_str().map(String::from))
                        .unwrap_or_default();
                    let (trtype, adrfam) = (l.address.trtype.clone(), l.address.adrfam.clone());
                    let ana: Vec<String> = l
                        .ana_states
                        .iter()
                        .map(|a| format!("{}:{}", a.ana_group, a.ana_state))
                        .collect();
                    vec![trtype, adrfam, address(&l.address), secure, ana.join(",")]
                })
                .collect();
            let columns = [
                ("TRTYPE", Align::Left),
                ("ADRFAM", Align::Left),
                ("ADDRESS", Align::Left),
                ("SECURE", Align::Left),
                ("ANA (GROUP:STATE)", Align::Left),
            ];
            print!("{}", client::table(&columns, rows));
            Ok(())
        }
        NvmfCommand::Reservation { nqn, nsid, out } => {
            let params = NsRef { nqn: full_nqn(&nqn), nsid, tgt_name: None };
            let v: ReservationView = client::call(&out.target, "nvmf_ns_get_reservation", &params)?;
            if out.json {
                return client::print_json(&v);
            }
            const TYPES: [&str; 7] = [
                "none",
                "write_exclusive",
                "exclusive_access",
                "write_exclusive_registrants_only",
                "exclusive_access_registrants_only",
                "write_exclusive_all_registrants",
                "exclusive_access_all_registrants",
            ];
            let kind = TYPES.get(usize::from(v.rtype)).copied().unwrap_or("unknown");
            let ptpl = match (v.ptpl, v.ptpl_capable) {
                (true, _) => "on",
                (false, true) => "off",
                (false, false) => "off (no pool)",
            };
            println!(
                "{} namespace {}: {kind}, generation {}, PTPL {ptpl}",
                params.nqn, v.nsid, v.generation
            );
            let rows = v
                .registrants
                .iter()
                .map(|e| {
                    let holds = if e.holds { "yes" } else { "no" };
                    vec![e.hostid.clone(), holds.to_string(), e.hostnqns.join(",")]
                })
                .collect();
            let columns =
                [("HOSTID", Align::Left), ("HOLDS", Align::Left), ("CONNECTED AS", Align::Left)];
            print!("{}", client::table(&columns, rows));
            Ok(())
        }
        NvmfCommand::AnaState { nqn, address, state, group, out } => {
            let nqn = full_nqn(&nqn);
            let params = SetAnaState {
                nqn: nqn.clone(),
                listen_address: listen_address(address),
                ana_state: state.clone(),
                anagrpid: group,
                tgt_name: None,
            };
            act(&out, "nvmf_subsystem_listener_set_ana_state", &params, |_: &bool| {
                let groups =
                    group.map_or("every ANA group".to_string(), |g| format!("ANA group {g}"));
                format!("{nqn}: {groups} is {state} through {address}")
            })
        }
    }
}

/// Subsystems as a table (one line per namespace) or JSON.
fn print_subsystems(list: &[SubsystemEntry], as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return client::print_json(&list);
    }
    let mut rows = Vec::new();
    for s in list {
        let hosts: Vec<String> = s
            .hosts
            .iter()
            .map(|h| if h.refused { format!("{}(refused)", h.nqn) } else { h.nqn.clone() })
            .collect();
        let access = match (s.allow_any_host, hosts.is_empty()) {
            (true, _) => "any".to_string(),
            (false, true) => "none".to_string(),
            (false, false) => hosts.join(","),
        };
        let listen: Vec<String> = s.listen_addresses.iter().map(address).collect();
        let listen = if listen.is_empty() { "-".to_string() } else { listen.join(",") };
        let namespaces = s.namespaces.as_deref().unwrap_or_default();
        let controllers = s.controllers.as_ref().map_or(0, Vec::len);
        let mut row = |nsid: String, bdev: String| {
            let c = controllers.to_string();
            let (nqn, kind) = (s.nqn.clone(), s.subtype.clone());
            rows.push(vec![nqn, kind, nsid, bdev, c, access.clone(), listen.clone()]);
        };
        if namespaces.is_empty() {
            row("-".into(), "-".into());
        }
        for ns in namespaces {
            row(ns.nsid.to_string(), ns.bdev_name.clone());
        }
    }
    use Align::{Left, Right};
    let columns = [
        ("NQN", Left),
        ("TYPE", Left),
        ("NSID", Right),
        ("BDEV", Left),
        ("CTRLRS", Right),
        ("HOSTS", Left),
        ("LISTEN", Left),
    ];
    print!("{}", client::table(&columns, rows));
    Ok(())
}
