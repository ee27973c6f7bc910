//! The authentication decoders under arbitrary input, shared by the cargo-fuzz targets
//! (`target/nvmf/fuzz`: `auth_message`, `key_parsers`) and this crate's proptests. Each case
//! panics when a property breaks; decoding may allocate at most a bounded multiple of the
//! input (callers wrap it in a [`crate::fuzzing::Meter`]).

use std::sync::{Arc, OnceLock};

use super::codec::Message;
use super::machine::{Action, AuthConfig, Event, QueueAuth};
use super::secret::DhchapSecret;
use super::{DhGroup, Entropy, HashId};
use crate::fuzzing::Meter;
use crate::psk::{PskIdentity, TlsKey};
use crate::secret::SecretBytes;

/// Decoding an AUTH payload: never panics; what decodes re-encodes to a payload that decodes
/// to the same message. Then the bytes drive a state machine mid-transaction.
pub fn auth_message_case(data: &[u8], meter: &mut impl Meter) {
    let decoded = meter.run(data.len() + 64, || Message::decode(data));
    if let Ok(message) = decoded {
        let mut again = Vec::new();
        message.encode(&mut again);
        assert_eq!(again.len(), data.len(), "re-encoding changed the length");
        assert_eq!(
            Message::decode(&again).as_ref(),
            Ok(&message),
            "re-encoding changed the message"
        );
    }
    // Any payload as the Reply to a real Challenge: a Failure1 or a Success1, never a panic,
    // and authenticated only if the payload carried the right response (it cannot here).
    let mut q = QueueAuth::new(config(), Box::new(Fixed));
    let negotiate =
        [&[0u8, 0, 0, 0, 1, 0, 0, 1, 1, 0, 1, 1, 1][..], &[0; 29], &[0], &[0; 29]].concat();
    assert_eq!(q.on_event(Event::Send(&negotiate)), Action::Accepted);
    assert!(matches!(q.on_event(Event::Receive { allocation_len: 4096 }), Action::Data(_)));
    assert_eq!(q.on_event(Event::Send(data)), Action::Accepted);
    let answer = q.on_event(Event::Receive { allocation_len: 4096 });
    assert!(matches!(answer, Action::Data(_)));
    assert!(!q.is_authenticated(), "authenticated by a forged reply");
}

/// The key and identity parsers: never panic, never echo a key in an error.
pub fn key_parsers_case(data: &[u8], meter: &mut impl Meter) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    meter.run(4 * data.len() + 1024, || {
        if let Ok(key) = TlsKey::parse(text) {
            assert_eq!(
                TlsKey::parse(&key.encode()).map(|k| k.key.expose().to_vec()).ok(),
                Some(key.key.expose().to_vec())
            );
        }
        if let Ok(secret) = DhchapSecret::parse(text) {
            let again = DhchapSecret::parse(&secret.encode()).expect("re-encoded secret parses");
            assert_eq!(again.key().expose(), secret.key().expose());
        }
        if let Ok(identity) = PskIdentity::parse(text) {
            assert_eq!(identity.to_string(), text);
        }
    });
}

struct Fixed;

impl Entropy for Fixed {
    fn fill(&mut self, buf: &mut [u8]) {
        buf.fill(0x5a);
    }
}

fn config() -> Arc<AuthConfig> {
    static CONFIG: OnceLock<Arc<AuthConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let secret =
                DhchapSecret::new(Some(HashId::Sha256), SecretBytes::from_slice(&[7; 32])).unwrap();
            let config = AuthConfig::new("nqn.fuzz.host", "nqn.fuzz.sub", &secret, Some(&secret))
                .with_preferences(&[HashId::Sha256], &[DhGroup::Null])
                .unwrap();
            Arc::new(config)
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::fuzzing::Unmetered;

    proptest! {
        #[test]
        fn auth_messages(data in prop::collection::vec(any::<u8>(), 0..1200)) {
            auth_message_case(&data, &mut Unmetered);
        }

        #[test]
        fn key_texts(text in "(NVMeTLSkey-1:0[0-3]:|DHHC-1:0[0-4]:|NVMe[01]R0[12] )[A-Za-z0-9+/=: .-]{0,100}") {
            key_parsers_case(text.as_bytes(), &mut Unmetered);
        }
    }
}
