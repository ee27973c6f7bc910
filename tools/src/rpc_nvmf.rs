//! NVMe-oF control methods, with SPDK's names and parameters so SPDK tooling works against us.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use serde_json::{json, Value};

use crate::rpc::{invalid, Control, RpcError, METHOD_NOT_FOUND};

fn str_param<'a>(p: &'a Value, key: &str) -> Result<&'a str, RpcError> {
    p.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("missing string param: {key}")))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

fn uuid(b: &[u8; 16]) -> String {
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

pub fn handle(control: &Control, method: &str, p: &Value) -> Result<Value, RpcError> {
    let target = &control.target;
    let err = |e: ballast_nvmf::subsys::SubsysError| invalid(e.to_string());
    match method {
        "nvmf_get_subsystems" => Ok(get_subsystems(control)),
        "nvmf_create_subsystem" => {
            let nqn = str_param(p, "nqn")?;
            let any = p.get("allow_any_host").and_then(Value::as_bool).unwrap_or(false);
            target.create_subsystem(nqn, any).map_err(err)?;
            tracing::info!(nqn, allow_any_host = any, "subsystem created");
            Ok(json!(true))
        }
        "nvmf_delete_subsystem" => {
            let nqn = str_param(p, "nqn")?;
            target.delete_subsystem(nqn).map_err(err)?;
            tracing::info!(nqn, "subsystem deleted");
            Ok(json!(true))
        }
        "nvmf_subsystem_add_ns" => {
            let nqn = str_param(p, "nqn")?;
            let ns =
                p.get("namespace").ok_or_else(|| invalid("missing object param: namespace"))?;
            let bdev = str_param(ns, "bdev_name")?;
            let nsid = ns.get("nsid").and_then(Value::as_u64).unwrap_or(0) as u32;
            let block_size = ns.get("block_size").and_then(Value::as_u64).unwrap_or(4096) as u32;
            let export = control.exports.get(bdev).filter(|_| !bdev.is_empty());
            let export = export.ok_or_else(|| invalid(format!("no bdev named {bdev:?}")))?;
            let nsid =
                target.add_namespace(nqn, nsid, export.dev.clone(), block_size).map_err(err)?;
            tracing::info!(nqn, nsid, bdev, "namespace added");
            Ok(json!(nsid))
        }
        "nvmf_subsystem_remove_ns" => {
            let nqn = str_param(p, "nqn")?;
            let nsid = p
                .get("nsid")
                .and_then(Value::as_u64)
                .ok_or_else(|| invalid("missing param: nsid"))?;
            target.remove_namespace(nqn, nsid as u32).map_err(err)?;
            Ok(json!(true))
        }
        "nvmf_subsystem_add_host" | "nvmf_subsystem_remove_host" => {
            let nqn = str_param(p, "nqn")?;
            let host = str_param(p, "host")?;
            let subsys =
                target.subsystem(nqn).ok_or_else(|| invalid(format!("no subsystem {nqn:?}")))?;
            if method == "nvmf_subsystem_add_host" {
                subsys.hosts.write().insert(host.to_string());
            } else {
                subsys.hosts.write().remove(host);
            }
            target.genctr.fetch_add(1, Ordering::Relaxed);
            crate::volumes::persist_hosts(control, nqn);
            Ok(json!(true))
        }
        "nvmf_subsystem_allow_any_host" => {
            let nqn = str_param(p, "nqn")?;
            let any = p.get("allow_any_host").and_then(Value::as_bool).unwrap_or(false);
            let subsys =
                target.subsystem(nqn).ok_or_else(|| invalid(format!("no subsystem {nqn:?}")))?;
            subsys.allow_any_host.store(any, Ordering::Relaxed);
            target.genctr.fetch_add(1, Ordering::Relaxed);
            crate::volumes::persist_hosts(control, nqn);
            Ok(json!(true))
        }
        "nvmf_subsystem_add_listener" => {
            let la = p
                .get("listen_address")
                .ok_or_else(|| invalid("missing object param: listen_address"))?;
            let trtype = la.get("trtype").and_then(Value::as_str).unwrap_or("tcp");
            if !trtype.eq_ignore_ascii_case("tcp") {
                return Err(invalid(format!("transport {trtype:?} not supported (tcp only)")));
            }
            let addr: SocketAddr =
                format!("{}:{}", str_param(la, "traddr")?, str_param(la, "trsvcid")?)
                    .parse()
                    .map_err(|e| invalid(format!("listen address: {e}")))?;
            let known = target
                .listeners
                .read()
                .iter()
                .any(|(a, port)| *a == addr.ip().to_string() && *port == addr.port());
            if !known {
                crate::serve::start_nvmf_listener(&control.cores, target, &control.admission, addr)
                    .map_err(|e| invalid(format!("{e:#}")))?;
            }
            Ok(json!(true))
        }
        _ => {
            Err(RpcError { code: METHOD_NOT_FOUND, message: format!("Method not found: {method}") })
        }
    }
}

fn get_subsystems(control: &Control) -> Value {
    let listeners: Vec<Value> = control
        .target
        .listeners
        .read()
        .iter()
        .map(|(a, p)| json!({"trtype": "TCP", "adrfam": if a.contains(':') { "IPv6" } else { "IPv4" }, "traddr": a, "trsvcid": p.to_string()}))
        .collect();
    let mut out = vec![json!({
        "nqn": ballast_nvmf::subsys::DISCOVERY_NQN,
        "subtype": "Discovery",
        "listen_addresses": listeners,
        "allow_any_host": true,
        "hosts": [],
    })];
    let names: Vec<(String, std::sync::Arc<dyn ballast_engine::BlockDev>)> =
        control.exports.list().iter().map(|e| (e.name.clone(), e.dev.clone())).collect();
    for s in control.target.subsystems() {
        let namespaces: Vec<Value> = s
            .namespaces
            .read()
            .values()
            .map(|ns| {
                let bdev = names
                    .iter()
                    .find(|(_, d)| std::sync::Arc::ptr_eq(d, &ns.dev))
                    .map(|(n, _)| n.clone())
                    .unwrap_or_default();
                json!({
                    "nsid": ns.nsid,
                    "bdev_name": bdev,
                    "name": bdev,
                    "nguid": hex(&ns.nguid),
                    "eui64": hex(&ns.eui64),
                    "uuid": uuid(&ns.uuid),
                    "block_size": 1u32 << ns.lba_shift,
                })
            })
            .collect();
        let hosts: Vec<Value> = s.hosts.read().iter().map(|h| json!({"nqn": h})).collect();
        out.push(json!({
            "nqn": s.nqn,
            "subtype": "NVMe",
            "listen_addresses": listeners,
            "allow_any_host": s.allow_any_host.load(Ordering::Relaxed),
            "hosts": hosts,
            "serial_number": s.serial,
            "model_number": s.model,
            "namespaces": namespaces,
            "controllers": control.target.controllers_of(&s.nqn).iter().map(|c| json!({"cntlid": c.cntlid, "hostnqn": c.hostnqn})).collect::<Vec<_>>(),
        }));
    }
    Value::Array(out)
}
