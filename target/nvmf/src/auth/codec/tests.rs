//! Golden bytes written from the kernel's structs (include/linux/nvme.h) and the Linux host's
//! own Negotiate (`nvme_auth_set_dhchap_negotiate_data`), round trips, and malformed fields.

use proptest::prelude::*;

use super::*;

/// The Negotiate every Linux host sends: SHA-256/384/512, DH groups null and ffdhe2048..8192.
pub(crate) fn linux_negotiate(tid: u16) -> Vec<u8> {
    let mut p = vec![0u8; 72];
    p[4..6].copy_from_slice(&tid.to_le_bytes());
    p[7] = 1; // napd
    p[8] = 1; // authid DH-HMAC-CHAP
    p[10] = 3; // halen
    p[11] = 6; // dhlen
    p[12..15].copy_from_slice(&[1, 2, 3]); // idlist[0..3]
    p[42..48].copy_from_slice(&[0, 1, 2, 3, 4, 5]); // idlist[30..36]
    p
}

#[test]
fn negotiate_golden() {
    let p = linux_negotiate(0x1234);
    let Message::Negotiate { tid, sc_c, descriptors } = Message::decode(&p).unwrap() else {
        panic!()
    };
    assert_eq!((tid, sc_c), (0x1234, SecureChannel::None));
    assert_eq!(descriptors.len(), 1);
    assert_eq!(descriptors[0].auth_id, AUTHID_DHCHAP);
    assert_eq!(descriptors[0].hash_ids(), &[1, 2, 3]);
    assert_eq!(descriptors[0].dh_ids(), &[0, 1, 2, 3, 4, 5]);
    let mut again = Vec::new();
    Message::Negotiate { tid, sc_c, descriptors }.encode(&mut again);
    assert_eq!(again, p);
}

#[test]
fn challenge_reply_success_failure_golden() {
    let c1 = [0xc1u8; 32];
    let dh = [0xd5u8; 256];
    let mut out = Vec::new();
    Message::Challenge {
        tid: 7,
        hash_id: 1,
        dh_group_id: 1,
        seqnum: 0x0102_0304,
        c1: &c1,
        dh_value: &dh,
    }
    .encode(&mut out);
    let mut expected = vec![0x01, 0x01, 0, 0, 7, 0, 32, 0, 1, 1, 0x00, 0x01, 4, 3, 2, 1];
    expected.extend_from_slice(&c1);
    expected.extend_from_slice(&dh);
    assert_eq!(out, expected);

    let r1 = [0x11u8; 48];
    let c2 = [0x22u8; 48];
    out.clear();
    Message::Reply { tid: 7, seqnum: 9, r1: &r1, c2: Some(&c2), dh_value: &[] }.encode(&mut out);
    let mut expected = vec![0x01, 0x02, 0, 0, 7, 0, 48, 0, 1, 0, 0, 0, 9, 0, 0, 0];
    expected.extend_from_slice(&r1);
    expected.extend_from_slice(&c2);
    assert_eq!(out, expected);

    out.clear();
    Message::Success1 { tid: 7, hl: 64, r2: None }.encode(&mut out);
    let mut expected = vec![0x01, 0x03, 0, 0, 7, 0, 64, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    expected.resize(16 + 64, 0);
    assert_eq!(out, expected);

    out.clear();
    Message::Success2 { tid: 0xabcd }.encode(&mut out);
    assert_eq!(out, [0x01, 0x04, 0, 0, 0xcd, 0xab, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);

    out.clear();
    Message::Failure1 { tid: 3, reason: FailureReason::IncorrectMessage }.encode(&mut out);
    assert_eq!(out, [0x00, 0xf1, 0, 0, 3, 0, 0x01, 0x07]);
    out.clear();
    Message::Failure2 { tid: 3, reason: FailureReason::Failed }.encode(&mut out);
    assert_eq!(out, [0x00, 0xf0, 0, 0, 3, 0, 0x01, 0x01]);
}

#[test]
fn malformed_fields_are_typed_errors() {
    let good = linux_negotiate(1);
    let with = |at: usize, value: u8| {
        let mut p = good.clone();
        p[at] = value;
        p
    };
    assert!(matches!(Message::decode(&good[..7]), Err(CodecError::Short { .. })));
    assert!(matches!(Message::decode(&good[..71]), Err(CodecError::Length { .. })));
    assert!(matches!(
        Message::decode(&[good.clone(), vec![0]].concat()),
        Err(CodecError::Length { .. })
    ));
    assert!(matches!(Message::decode(&with(2, 1)), Err(CodecError::Reserved { offset: 2, .. })));
    assert!(matches!(Message::decode(&with(6, 4)), Err(CodecError::Field { field: "SC_C", .. })));
    assert!(matches!(Message::decode(&with(7, 0)), Err(CodecError::Field { field: "NAPD", .. })));
    assert!(matches!(Message::decode(&with(7, 2)), Err(CodecError::Length { .. })));
    assert!(matches!(
        Message::decode(&with(10, 31)),
        Err(CodecError::Field { field: "HALEN", .. })
    ));
    assert!(matches!(
        Message::decode(&with(11, 31)),
        Err(CodecError::Field { field: "DHLEN", .. })
    ));
    assert!(matches!(Message::decode(&with(20, 9)), Err(CodecError::Reserved { offset: 20, .. })));
    assert!(matches!(Message::decode(&with(1, 0x05)), Err(CodecError::UnknownMessage { .. })));
    assert!(matches!(Message::decode(&with(0, 0x02)), Err(CodecError::UnknownMessage { .. })));

    let mut reply = Vec::new();
    Message::Reply { tid: 1, seqnum: 0, r1: &[1; 32], c2: None, dh_value: &[5; 256] }
        .encode(&mut reply);
    assert!(Message::decode(&reply).is_ok());
    let mut bad_hl = reply.clone();
    bad_hl[6] = 33;
    assert!(matches!(Message::decode(&bad_hl), Err(CodecError::Field { field: "HL", .. })));
    let mut bad_cvalid = reply.clone();
    bad_cvalid[8] = 2;
    assert!(matches!(Message::decode(&bad_cvalid), Err(CodecError::Field { field: "CVALID", .. })));
    let mut long_dh = reply.clone();
    long_dh[10..12].copy_from_slice(&1025u16.to_le_bytes());
    assert!(matches!(Message::decode(&long_dh), Err(CodecError::Field { field: "DHVLEN", .. })));
    assert!(matches!(Message::decode(&reply[..reply.len() - 1]), Err(CodecError::Length { .. })));

    let failure = [0x00, 0xf0, 0, 0, 3, 0, 0x01, 0x08];
    assert!(matches!(Message::decode(&failure), Err(CodecError::Field { .. })));
    assert!(matches!(Message::decode(&vec![0; MESSAGE_MAX + 1]), Err(CodecError::TooLong { .. })));
}

fn hash_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![Just(32usize), Just(48), Just(64)]
        .prop_flat_map(|n| prop::collection::vec(any::<u8>(), n))
}

fn message_bytes() -> impl Strategy<Value = Vec<u8>> {
    let dh = prop::collection::vec(any::<u8>(), 0..=DH_VALUE_MAX);
    let reason = (1u8..=7).prop_map(|c| FailureReason::from_code(c).unwrap());
    let descriptor = (
        any::<u8>(),
        prop::collection::vec(any::<u8>(), 0..=30),
        prop::collection::vec(any::<u8>(), 0..=30),
    )
        .prop_map(|(id, h, d)| Descriptor { auth_id: id, ..Descriptor::dhchap(&h, &d).unwrap() });
    prop_oneof![
        (any::<u16>(), 0u8..4, prop::collection::vec(descriptor, 1..4)).prop_map(
            |(tid, sc, descriptors)| {
                let sc_c = [
                    SecureChannel::None,
                    SecureChannel::Concat,
                    SecureChannel::NewTlsPsk,
                    SecureChannel::ReplaceTlsPsk,
                ][sc as usize];
                encoded(&Message::Negotiate { tid, sc_c, descriptors })
            }
        ),
        (any::<u16>(), any::<u8>(), any::<u8>(), any::<u32>(), hash_bytes(), dh.clone()).prop_map(
            |(tid, hash_id, dh_group_id, seqnum, c1, dh_value)| {
                encoded(&Message::Challenge {
                    tid,
                    hash_id,
                    dh_group_id,
                    seqnum,
                    c1: &c1,
                    dh_value: &dh_value,
                })
            }
        ),
        (any::<u16>(), any::<u32>(), hash_bytes(), any::<bool>(), dh).prop_map(
            |(tid, seqnum, r1, cvalid, dh_value)| {
                let c2: Vec<u8> = r1.iter().map(|b| b ^ 0x5a).collect();
                encoded(&Message::Reply {
                    tid,
                    seqnum,
                    r1: &r1,
                    c2: cvalid.then_some(&c2[..]),
                    dh_value: &dh_value,
                })
            }
        ),
        (any::<u16>(), hash_bytes(), any::<bool>()).prop_map(|(tid, r2, rvalid)| {
            encoded(&Message::Success1 { tid, hl: r2.len() as u8, r2: rvalid.then_some(&r2[..]) })
        }),
        any::<u16>().prop_map(|tid| encoded(&Message::Success2 { tid })),
        (any::<u16>(), reason.clone())
            .prop_map(|(tid, reason)| encoded(&Message::Failure1 { tid, reason })),
        (any::<u16>(), reason)
            .prop_map(|(tid, reason)| encoded(&Message::Failure2 { tid, reason })),
    ]
}

fn encoded(m: &Message<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    m.encode(&mut out);
    out
}

proptest! {
    #[test]
    fn encode_decode_round_trip(bytes in message_bytes()) {
        let message = Message::decode(&bytes).unwrap();
        prop_assert_eq!(encoded(&message), bytes);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..1400)) {
        // Decoding is total; what decodes re-encodes to bytes that decode the same (C2 and
        // R2 bytes are ignored, not kept, when CVALID / RVALID is clear).
        if let Ok(message) = Message::decode(&bytes) {
            let again = encoded(&message);
            prop_assert_eq!(Message::decode(&again).unwrap(), message);
            prop_assert_eq!(again.len(), bytes.len());
        }
    }
}
