//! Known answers from target/nvmf/testdata/dhchap_kat.py, an independent Python port of the
//! kernel host's response computations (drivers/nvme/host/auth.c) and key transform
//! (drivers/nvme/common/auth.c).

use super::*;
use crate::auth::secret::DhchapSecret;

pub(crate) const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:ballast-kat-host";
pub(crate) const SUBNQN: &str = "nqn.2026-11.dev.ballast:kat";

/// DHHC-1:01: with key bytes 0..32, and DHHC-1:03: with key bytes 100..164.
pub(crate) fn kat_secrets() -> (DhchapSecret, DhchapSecret) {
    let host =
        DhchapSecret::new(Some(HashId::Sha256), SecretBytes::new((0u8..32).collect())).unwrap();
    let ctrl =
        DhchapSecret::new(Some(HashId::Sha512), SecretBytes::new((100u8..164).collect())).unwrap();
    (host, ctrl)
}

pub(crate) fn hex(text: &str) -> Vec<u8> {
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap()).collect()
}

#[test]
fn transformed_key_matches_the_kernel_port() {
    let (host, _) = kat_secrets();
    assert_eq!(
        host.transformed(HOSTNQN).expose(),
        &hex("e46a374f88fe6ee7d781ebee435d32b5c57d01c45d02128e2538d59dc9a26973")[..]
    );
}

#[test]
fn null_group_responses_match_the_kernel_port() {
    let (host, ctrl) = kat_secrets();
    let t = Transaction { hash: HashId::Sha256, tid: 0x0102, hostnqn: HOSTNQN, subnqn: SUBNQN };
    let c1: Vec<u8> = (0..32u8).map(|i| 0xa0u8.wrapping_add(i)).collect();
    let r1 = host_response(&t, &host.transformed(HOSTNQN), &c1, 0x1122_3344, 0);
    assert_eq!(
        r1.as_ref(),
        &hex("b111726605f0d0ac9d6d5cceab1583fbc0e391c03f8e5d5cee56f6cc9a552a28")[..]
    );
    let c2: Vec<u8> = (0..32u8).map(|i| 0x50u8.wrapping_add(i)).collect();
    let r2 = controller_response(&t, &ctrl.transformed(SUBNQN), &c2, 0x5566_7788);
    assert_eq!(
        r2.as_ref(),
        &hex("c8b2353db7fe4c7e68e86b66c00e1833815ec8b6f0b706a380a2d4f1901a3a6a")[..]
    );
    // Each input matters: another sequence number, T_ID or NQN gives another response.
    assert!(!host_response(&t, &host.transformed(HOSTNQN), &c1, 0x1122_3345, 0).ct_eq(r1.as_ref()));
    let other = Transaction { tid: 0x0103, ..t };
    assert!(
        !host_response(&other, &host.transformed(HOSTNQN), &c1, 0x1122_3344, 0).ct_eq(r1.as_ref())
    );
    let other = Transaction { subnqn: "nqn.other", ..t };
    assert!(
        !host_response(&other, &host.transformed(HOSTNQN), &c1, 0x1122_3344, 0).ct_eq(r1.as_ref())
    );
}

#[test]
fn digest_debug_hides_bytes() {
    let digest = hash(HashId::Sha384, b"abc");
    assert_eq!(digest.as_ref().len(), 48);
    assert_eq!(format!("{digest:?}"), "Digest(48 bytes)");
    // FIPS 180-2 SHA-384("abc") starts cb00753f45a35e8b.
    assert_eq!(&digest.as_ref()[..8], &hex("cb00753f45a35e8b")[..]);
}
