//! JSON-RPC error replies with SPDK's codes and messages, and typed parameter decoding.
//!
//! A leaf module: every method module uses it, it uses none of them. SPDK answers with a
//! JSON-RPC code (-32602 "Invalid parameters", -32603 for decoding failures in its lvol
//! methods) or a negative errno whose message is `strerror` ("No such device" for -19); we send
//! the same codes and the same message text, followed by `: detail` where we know more.

use serde::de::DeserializeOwned;
use serde_json::Value;

/// The parameters of a method that takes none: absent, `null` or `{}` (anything more is
/// refused, as SPDK's getters refuse parameters).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// JSON-RPC "Invalid params" (SPDK_JSONRPC_ERROR_INVALID_PARAMS).
pub const INVALID_PARAMS: i64 = -32602;
/// JSON-RPC "Method not found".
pub const METHOD_NOT_FOUND: i64 = -32601;
/// JSON-RPC "Internal error" (SPDK_JSONRPC_ERROR_INTERNAL_ERROR).
pub const INTERNAL_ERROR: i64 = -32603;
/// -ENODEV: SPDK's answer for a bdev or lvol store that does not exist.
pub const ENODEV: i64 = -19;
/// -EINVAL: SPDK's answer for contradictory arguments (both an lvstore name and UUID).
pub const EINVAL: i64 = -22;
/// -EEXIST: a name already in use.
pub const EEXIST: i64 = -17;
/// SPDK's `-ENOENT`: "No such file or directory".
pub const ENOENT: i64 = -2;
/// SPDK's `-ENOMEM`: "Cannot allocate memory" (a limit reached).
pub const ENOMEM: i64 = -12;

/// One error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
}

impl RpcError {
    pub fn new(code: i64, message: impl Into<String>) -> RpcError {
        RpcError { code, message: message.into() }
    }
}

/// -32602 with our own message (ballast's methods, and details SPDK has no text for).
pub fn invalid(message: impl Into<String>) -> RpcError {
    RpcError::new(INVALID_PARAMS, message)
}

/// SPDK's -32602 "Invalid parameters", with what was wrong after it.
pub fn invalid_parameters(detail: impl std::fmt::Display) -> RpcError {
    RpcError::new(INVALID_PARAMS, format!("Invalid parameters: {detail}"))
}

/// SPDK's -19 "No such device" (exactly its `spdk_strerror(ENODEV)` text).
pub fn no_such_device() -> RpcError {
    RpcError::new(ENODEV, "No such device")
}

/// SPDK's -22 "Invalid argument".
pub fn invalid_argument() -> RpcError {
    RpcError::new(EINVAL, "Invalid argument")
}

pub fn method_not_found(method: &str) -> RpcError {
    RpcError::new(METHOD_NOT_FOUND, format!("Method not found: {method}"))
}

/// How a method family reports parameters that do not decode.
#[derive(Debug, Clone, Copy)]
pub enum DecodeStyle {
    /// SPDK's lvol methods: -32603 "spdk_json_decode_object failed".
    Lvol,
    /// Everything else: -32602 "Invalid parameters".
    Generic,
}

/// Decodes `params` (absent or `null` counts as `{}`) into `T`; a failure names the field.
pub fn params<T: DeserializeOwned>(p: &Value, style: DecodeStyle) -> Result<T, RpcError> {
    let p = if p.is_null() { Value::Object(Default::default()) } else { p.clone() };
    if !p.is_object() {
        // serde would read a struct from an array positionally; SPDK's decoders take objects.
        return Err(match style {
            DecodeStyle::Lvol => RpcError::new(
                INTERNAL_ERROR,
                "spdk_json_decode_object failed: params not an object",
            ),
            DecodeStyle::Generic => invalid_parameters("params must be an object"),
        });
    }
    serde_json::from_value(p).map_err(|e| match style {
        DecodeStyle::Lvol => {
            RpcError::new(INTERNAL_ERROR, format!("spdk_json_decode_object failed: {e}"))
        }
        DecodeStyle::Generic => invalid_parameters(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct P {
        name: String,
        #[serde(default)]
        force: bool,
    }

    #[test]
    fn absent_params_decode_as_an_empty_object() {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct None_ {
            name: Option<String>,
        }
        let p: None_ = params(&Value::Null, DecodeStyle::Generic).unwrap();
        assert!(p.name.is_none());
    }

    #[test]
    fn unknown_and_missing_fields_get_spdk_codes() {
        let e = params::<P>(&json!({"name": "a", "bogus": 1}), DecodeStyle::Generic).unwrap_err();
        assert_eq!(e.code, INVALID_PARAMS);
        assert!(e.message.starts_with("Invalid parameters: unknown field `bogus`"), "{e:?}");
        let e = params::<P>(&json!({}), DecodeStyle::Lvol).unwrap_err();
        assert_eq!(e.code, INTERNAL_ERROR);
        assert!(e.message.starts_with("spdk_json_decode_object failed"), "{e:?}");
        let ok: P = params(&json!({"name": "a"}), DecodeStyle::Lvol).unwrap();
        assert_eq!((ok.name.as_str(), ok.force), ("a", false));
    }
}
