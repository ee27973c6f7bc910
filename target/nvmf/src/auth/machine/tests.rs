//! The state machine against the kernel host's behaviour: a known-answer run with a scripted
//! entropy source against target/nvmf/testdata/dhchap_kat.py (ffdhe2048, SHA-384,
//! bidirectional), then flows for every hash and group, wrong secrets and out-of-order
//! messages.

use std::collections::VecDeque;

use super::*;
use crate::auth::chap::tests::{hex, kat_secrets, HOSTNQN, SUBNQN};
use crate::auth::codec::tests::linux_negotiate;
use crate::secret::SecretBytes;

/// Hands out scripted chunks in order, then a counter.
struct Script(VecDeque<Vec<u8>>, u8);

impl Entropy for Script {
    fn fill(&mut self, buf: &mut [u8]) {
        match self.0.pop_front() {
            Some(chunk) => {
                assert_eq!(chunk.len(), buf.len(), "scripted entropy out of step");
                buf.copy_from_slice(&chunk);
            }
            None => buf.iter_mut().for_each(|b| {
                self.1 = self.1.wrapping_mul(29).wrapping_add(13);
                *b = self.1;
            }),
        }
    }
}

fn queue(config: AuthConfig, script: Vec<Vec<u8>>) -> QueueAuth {
    QueueAuth::new(Arc::new(config), Box::new(Script(script.into(), 1)))
}

fn data(action: Action) -> Vec<u8> {
    match action {
        Action::Data(bytes) => bytes,
        other => panic!("expected data, got {other:?}"),
    }
}

fn receive(q: &mut QueueAuth) -> Vec<u8> {
    data(q.on_event(Event::Receive { allocation_len: 4096 }))
}

fn send(q: &mut QueueAuth, bytes: &[u8]) {
    assert_eq!(q.on_event(Event::Send(bytes)), Action::Accepted);
}

fn encoded(m: Message<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    m.encode(&mut out);
    out
}

fn failure1(bytes: &[u8]) -> FailureReason {
    match Message::decode(bytes).unwrap() {
        Message::Failure1 { reason, .. } => reason,
        other => panic!("expected Failure1, got {other:?}"),
    }
}

#[test]
fn kernel_host_known_answer_ffdhe2048_sha384_bidirectional() {
    let (host, ctrl) = kat_secrets();
    let config = AuthConfig::new(HOSTNQN, SUBNQN, &host, Some(&ctrl))
        .with_preferences(&[HashId::Sha384], &[DhGroup::Ffdhe2048])
        .unwrap();
    let c1: Vec<u8> = (0..48u32).map(|i| (0x31 * i + 7) as u8).collect();
    let mut x: Vec<u8> = (0..29u32).map(|i| (0x5b * i + 3) as u8).collect();
    x[0] &= 0x01;
    // The entropy draws C1, S1, then a 29 byte exponent whose top byte it masks itself.
    let mut x_drawn = x.clone();
    x_drawn[0] |= 0xfe;
    let mut q = queue(config, vec![c1.clone(), vec![0x78, 0x56, 0x34, 0x12], x_drawn]);
    send(&mut q, &linux_negotiate(0x0a0b));
    assert_eq!(q.state_name(), "ChallengePending");
    let challenge = receive(&mut q);
    use sha2::Digest as _;
    assert_eq!(
        sha2::Sha256::digest(&challenge)[..],
        hex("e64419b14bbec89be9a419fd3ef93e37175293e9e755b56fc85cc872b8813dc7")[..]
    );
    assert_eq!(q.state_name(), "WaitReply");
    let reply = hex(concat!(
        "010200000b0a300001000001040302010638f5b96f5998032792636ce88dd8b9989590f1445959fbd2288836c463",
        "ba31fac33ebbbd410182a21c07aad076fdd3012a537ca5cef72049729bc4ed163f6891bae30c355e87b0d9022b547da6",
        "cff8214a739cc5ee17406992bbe40d365f88e22dc64f4fd201da00e822bf6e257325b398b2052e974ce2aab368ead0b3",
        "0f672ad01f55100a1af717103a304e0d11a0ffa0099be343fa3ad2f13f3f8ae8d412a7692047234b9b16183697a329fb",
        "b5ecf1efb8cb600a8ac43032dc597894cc5eccbf961b729d57a150039e1ab577d11d4bf9d4aaa7dc584729fd875e59ad",
        "8a7323bf8524532cd03f5e3ec4b23dcee565653bdad91b40323dc7a1e654606a9d475369121c96c39ffe3caff66fb3f4",
        "8b63580e89091cfd1108d1fb88bf4e330c1dddadb46abbacf982704c1faae42a47559b52a19755f4d826b17a9db53426",
        "9c04a09eed8bbcba041d344034077864d4810810d4a8d999e895ad1a1c888932f527",
    ));
    send(&mut q, &reply);
    assert_eq!(q.state_name(), "Success1Pending");
    assert!(!q.is_authenticated());
    let success1 = receive(&mut q);
    assert_eq!(
        success1,
        hex(concat!(
            "010300000b0a3000010000000000000006ac050e56039df2be2518a88cb401fefcc4edac59175eadcc6ebfcb",
            "900b834639fbb75b0e6470c802c20b5751f9151f",
        ))
    );
    assert_eq!(q.state_name(), "WaitSuccess2");
    assert!(!q.is_authenticated());
    send(&mut q, &encoded(Message::Success2 { tid: 0x0a0b }));
    assert!(q.is_authenticated());
    assert_eq!(q.negotiated(), Some((HashId::Sha384, DhGroup::Ffdhe2048)));
}

/// A Linux-like host: computes R1 (and checks R2) the way drivers/nvme/host/auth.c does.
struct Host {
    secret: DhchapSecret,
    ctrl_secret: Option<DhchapSecret>,
    hostnqn: &'static str,
}

impl Host {
    /// Runs one whole transaction; returns the Success1 or Failure1 the controller sent.
    fn authenticate(&self, q: &mut QueueAuth, tid: u16) -> Vec<u8> {
        send(q, &linux_negotiate(tid));
        let challenge = receive(q);
        let Message::Challenge { hash_id, dh_group_id, seqnum, c1, dh_value, .. } =
            Message::decode(&challenge).unwrap()
        else {
            return challenge;
        };
        let hash = HashId::from_id(hash_id).unwrap();
        let group = DhGroup::from_id(dh_group_id).unwrap();
        let t = Transaction { hash, tid, hostnqn: self.hostnqn, subnqn: SUBNQN };
        let (host_pub, shared) = match group {
            DhGroup::Null => (Vec::new(), None),
            group => {
                let mine = DhKeyPair::generate(group, &mut Script(VecDeque::new(), 77)).unwrap();
                (mine.public_value(), Some(mine.shared_secret(dh_value).unwrap()))
            }
        };
        let aug = |c: &[u8]| match &shared {
            Some(s) => chap::augmented_challenge(hash, s, c).as_ref().to_vec(),
            None => c.to_vec(),
        };
        let r1 =
            chap::host_response(&t, &self.secret.transformed(self.hostnqn), &aug(c1), seqnum, 0);
        let c2 = vec![0x42; hash.len_bytes()];
        let reply = encoded(Message::Reply {
            tid,
            seqnum: 0x99,
            r1: r1.as_ref(),
            c2: self.ctrl_secret.as_ref().map(|_| &c2[..]),
            dh_value: &host_pub,
        });
        send(q, &reply);
        let success1 = receive(q);
        if let (Ok(Message::Success1 { r2: Some(r2), .. }), Some(ctrl)) =
            (Message::decode(&success1), &self.ctrl_secret)
        {
            let expected =
                chap::controller_response(&t, &ctrl.transformed(SUBNQN), &aug(&c2), 0x99);
            assert!(expected.ct_eq(r2), "controller response");
            send(q, &encoded(Message::Success2 { tid }));
        }
        success1
    }
}

fn secret(hash: Option<HashId>, seed: u8) -> DhchapSecret {
    let len = hash.map_or(48, HashId::len_bytes);
    DhchapSecret::new(hash, SecretBytes::new((0..len as u8).map(|b| b ^ seed).collect())).unwrap()
}

#[test]
fn every_hash_and_group_authenticates_both_ways() {
    for hash in HashId::ALL {
        for group in DhGroup::ALL.into_iter().filter(|g| *g <= DhGroup::Ffdhe3072) {
            for bidirectional in [false, true] {
                let host = Host {
                    secret: secret(Some(hash), 1),
                    ctrl_secret: bidirectional.then(|| secret(None, 2)),
                    hostnqn: HOSTNQN,
                };
                let config =
                    AuthConfig::new(HOSTNQN, SUBNQN, &host.secret, host.ctrl_secret.as_ref())
                        .with_preferences(&[hash], &[group])
                        .unwrap();
                let mut q = queue(config, Vec::new());
                let last = host.authenticate(&mut q, 5);
                assert!(
                    matches!(Message::decode(&last), Ok(Message::Success1 { .. })),
                    "{hash:?} {group:?}"
                );
                assert!(q.is_authenticated(), "{hash:?} {group:?} {bidirectional}");
                assert_eq!(q.negotiated(), Some((hash, group)));
            }
        }
    }
}

#[test]
fn default_preferences_pick_the_strongest_hash_and_ffdhe3072() {
    let host = Host { secret: secret(None, 3), ctrl_secret: None, hostnqn: HOSTNQN };
    let mut q = queue(AuthConfig::new(HOSTNQN, SUBNQN, &host.secret, None), Vec::new());
    send(&mut q, &linux_negotiate(1));
    let challenge = receive(&mut q);
    let Message::Challenge { hash_id, dh_group_id, dh_value, .. } =
        Message::decode(&challenge).unwrap()
    else {
        panic!()
    };
    assert_eq!((hash_id, dh_group_id, dh_value.len()), (3, 2, 384));
}

#[test]
fn wrong_secrets_fail() {
    let right = secret(Some(HashId::Sha256), 1);
    // The host's secret differs from the one configured for it.
    let host =
        Host { secret: secret(Some(HashId::Sha256), 9), ctrl_secret: None, hostnqn: HOSTNQN };
    let config = AuthConfig::new(HOSTNQN, SUBNQN, &right, None)
        .with_preferences(&[HashId::Sha256], &[DhGroup::Ffdhe2048])
        .unwrap();
    let mut q = queue(config, Vec::new());
    assert_eq!(failure1(&host.authenticate(&mut q, 3)), FailureReason::Failed);
    assert!(!q.is_authenticated());
    assert_eq!(q.state_name(), "Failed");
    // The right secret from another host NQN fails too (the transform binds the NQN).
    let host = Host {
        secret: right.clone(),
        ctrl_secret: None,
        hostnqn: "nqn.2014-08.org.nvmexpress:uuid:other",
    };
    let config = AuthConfig::new(HOSTNQN, SUBNQN, &right, None);
    let mut q = queue(config, Vec::new());
    assert_eq!(failure1(&host.authenticate(&mut q, 3)), FailureReason::Failed);
    // A host asking for bidirectional authentication when no controller secret is configured.
    let host = Host { secret: right.clone(), ctrl_secret: Some(secret(None, 2)), hostnqn: HOSTNQN };
    let mut q = queue(AuthConfig::new(HOSTNQN, SUBNQN, &right, None), Vec::new());
    assert_eq!(failure1(&host.authenticate(&mut q, 4)), FailureReason::Failed);
    assert!(!q.is_authenticated());
}

/// A re-authentication after the host's key was replaced proves the new key (the old one
/// fails); once the key is removed, no re-authentication succeeds.
#[test]
fn each_transaction_uses_the_keys_configured_at_its_negotiate() {
    let config = |s: &DhchapSecret| {
        Arc::new(
            AuthConfig::new(HOSTNQN, SUBNQN, s, None)
                .with_preferences(&[HashId::Sha256], &[DhGroup::Null])
                .unwrap(),
        )
    };
    let (old, new) = (secret(Some(HashId::Sha256), 1), secret(Some(HashId::Sha256), 2));
    let host = |s: &DhchapSecret| Host { secret: s.clone(), ctrl_secret: None, hostnqn: HOSTNQN };
    let mut q = QueueAuth::new(config(&old), Box::new(Script(VecDeque::new(), 1)));
    host(&old).authenticate(&mut q, 1);
    assert!(q.is_authenticated());
    q.rekey(Some(config(&new)));
    assert_eq!(failure1(&host(&old).authenticate(&mut q, 2)), FailureReason::Failed);
    q.rekey(Some(config(&new)));
    host(&new).authenticate(&mut q, 3);
    assert!(q.is_authenticated(), "the rotated key authenticates");
    q.rekey(None);
    assert_eq!(failure1(&host(&new).authenticate(&mut q, 5)), FailureReason::Failed);
    assert!(!q.is_authenticated(), "a removed key authenticates nothing");
}

#[test]
fn out_of_order_messages_are_refused() {
    let host_secret = secret(None, 1);
    let config = || {
        AuthConfig::new(HOSTNQN, SUBNQN, &host_secret, None)
            .with_preferences(&[HashId::Sha256], &[DhGroup::Null])
            .unwrap()
    };
    let reply =
        encoded(Message::Reply { tid: 1, seqnum: 0, r1: &[0; 32], c2: None, dh_value: &[] });

    // A Reply before any Negotiate.
    let mut q = queue(config(), Vec::new());
    send(&mut q, &reply);
    assert_eq!(failure1(&receive(&mut q)), FailureReason::IncorrectMessage);
    assert!(!q.is_authenticated());

    // A Reply before the Challenge was fetched.
    let mut q = queue(config(), Vec::new());
    send(&mut q, &linux_negotiate(1));
    send(&mut q, &reply);
    assert_eq!(failure1(&receive(&mut q)), FailureReason::IncorrectMessage);

    // A Success2 instead of the Reply.
    let mut q = queue(config(), Vec::new());
    send(&mut q, &linux_negotiate(1));
    receive(&mut q);
    send(&mut q, &encoded(Message::Success2 { tid: 1 }));
    assert_eq!(failure1(&receive(&mut q)), FailureReason::IncorrectMessage);
    // Failed stays failed: even a correct-looking Reply is ignored until a new Negotiate.
    send(&mut q, &reply);
    assert_eq!(q.state_name(), "Failed");

    // A Reply with another transaction id.
    let mut q = queue(config(), Vec::new());
    send(&mut q, &linux_negotiate(2));
    receive(&mut q);
    send(&mut q, &reply);
    assert_eq!(failure1(&receive(&mut q)), FailureReason::IncorrectPayload);

    // An AUTH_Receive with nothing to receive.
    let mut q = queue(config(), Vec::new());
    assert_eq!(failure1(&receive(&mut q)), FailureReason::IncorrectMessage);

    // Garbage.
    let mut q = queue(config(), Vec::new());
    send(&mut q, &[0x01, 0x02, 0, 0]);
    assert_eq!(failure1(&receive(&mut q)), FailureReason::IncorrectPayload);

    // The host gives up with Failure2.
    let mut q = queue(config(), Vec::new());
    send(&mut q, &linux_negotiate(1));
    receive(&mut q);
    send(&mut q, &encoded(Message::Failure2 { tid: 1, reason: FailureReason::Failed }));
    assert_eq!(q.state_name(), "Failed");

    // And a new Negotiate starts over, after which the host can still succeed.
    let host = Host { secret: host_secret.clone(), ctrl_secret: None, hostnqn: HOSTNQN };
    host.authenticate(&mut q, 7);
    assert!(q.is_authenticated());
}

#[test]
fn negotiation_failures_name_their_reason() {
    let host_secret = secret(None, 1);
    let config = AuthConfig::new(HOSTNQN, SUBNQN, &host_secret, None)
        .with_preferences(&[HashId::Sha256], &[DhGroup::Ffdhe4096])
        .unwrap();
    let config = Arc::new(config);
    let case = |negotiate: Vec<u8>| {
        let mut q = QueueAuth::new(config.clone(), Box::new(Script(VecDeque::new(), 1)));
        send(&mut q, &negotiate);
        failure1(&receive(&mut q))
    };
    let mut no_sha256 = linux_negotiate(1);
    no_sha256[10] = 1;
    no_sha256[12..15].copy_from_slice(&[2, 0, 0]);
    assert_eq!(case(no_sha256), FailureReason::HashUnusable);
    let mut no_4096 = linux_negotiate(1);
    no_4096[11] = 2;
    no_4096[44..48].fill(0);
    assert_eq!(case(no_4096), FailureReason::DhGroupUnusable);
    let mut concat = linux_negotiate(1);
    concat[6] = 1;
    assert_eq!(case(concat), FailureReason::ConcatMismatch);
    let mut other_protocol = linux_negotiate(1);
    other_protocol[8] = 2;
    assert_eq!(case(other_protocol), FailureReason::IncorrectPayload);
}

#[test]
fn small_allocation_keeps_the_message() {
    let host_secret = secret(None, 1);
    let mut q = queue(AuthConfig::new(HOSTNQN, SUBNQN, &host_secret, None), Vec::new());
    send(&mut q, &linux_negotiate(1));
    assert_eq!(
        q.on_event(Event::Receive { allocation_len: 100 }),
        Action::AllocationTooSmall { needed: 16 + 64 + 384 }
    );
    assert_eq!(q.state_name(), "ChallengePending");
    assert_eq!(receive(&mut q).len(), 16 + 64 + 384);
}
