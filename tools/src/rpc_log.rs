//! SPDK's log methods, on the daemon's one log (`logging`): `log_set_level` / `log_get_level`
//! and `log_set_print_level` / `log_get_print_level` (SPDK keeps a syslog level and a stderr
//! level; ballast has one sink, so both pairs set and read the same level),
//! `log_set_flag` / `log_clear_flag` / `log_get_flags` (a component's debug messages, shown
//! whatever the level). Changes take effect at once and last until the daemon stops (the
//! next start takes `RUST_LOG` again). An unknown level or flag is refused and changes
//! nothing (SPDK ignores an unknown flag).

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::control::{Control, Method};
use crate::logging::LogError;
use crate::rpc_error::{invalid_parameters, params, DecodeStyle, NoParams, RpcError};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Level {
    level: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Flag {
    flag: String,
}

const G: DecodeStyle = DecodeStyle::Generic;

pub const METHODS: &[Method] = &[
    Method { name: "log_set_level", call: set_level },
    Method { name: "log_get_level", call: get_level },
    Method { name: "log_set_print_level", call: set_level },
    Method { name: "log_get_print_level", call: get_level },
    Method { name: "log_set_flag", call: |c, p| set_flag(c, p, true) },
    Method { name: "log_clear_flag", call: |c, p| set_flag(c, p, false) },
    Method { name: "log_get_flags", call: get_flags },
];

fn refused(e: LogError) -> RpcError {
    invalid_parameters(e)
}

fn set_level(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let l: Level = params(p, G)?;
    let now = control.log.change(|s| s.set_level(&l.level)).map_err(refused)?;
    tracing::info!(level = now.level(), filter = %now.directives(), "log level set");
    Ok(json!(true))
}

fn get_level(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let _: NoParams = params(p, G)?;
    Ok(json!(control.log.state().level()))
}

fn set_flag(control: &Control, p: &Value, on: bool) -> Result<Value, RpcError> {
    let f: Flag = params(p, G)?;
    let now = control.log.change(|s| s.set_flag(&f.flag, on)).map_err(refused)?;
    tracing::info!(flag = f.flag, on, filter = %now.directives(), "log flag changed");
    Ok(json!(true))
}

fn get_flags(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let _: NoParams = params(p, G)?;
    let flags: Map<String, Value> =
        control.log.state().flags().map(|(name, on)| (name.to_string(), json!(on))).collect();
    Ok(Value::Object(flags))
}
