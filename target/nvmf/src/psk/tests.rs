//! Known answers from libnvme's own test suite (test/psk.c: `test_data_psk`,
//! `test_data_identity`, `test_data_identity_compat`) and RFC 8448.

use super::*;

/// test/psk.c's configured PSK (32 bytes), and the 48 byte one (the same 32 plus bytes 16..32).
const KEY32: [u8; 32] = [
    0x55, 0x12, 0xDB, 0xB6, 0x73, 0x7D, 0x01, 0x06, 0xF6, 0x59, 0x75, 0xB7, 0x73, 0xDF, 0xB0, 0x11,
    0xFF, 0xC3, 0x44, 0xBC, 0xF4, 0x42, 0xE2, 0xDD, 0x6D, 0x8B, 0xC4, 0x87, 0x0B, 0x5D, 0x5B, 0x03,
];

fn key48() -> Vec<u8> {
    let mut key = KEY32.to_vec();
    key.extend_from_slice(&KEY32[16..]);
    key
}

const HOST: &str = "nqn.psk-test-host";
const SUB: &str = "nqn.psk-test-subsys";

#[test]
fn libnvme_interchange_vectors() {
    let cases: [(PskTransform, Vec<u8>, &str); 3] = [
        (PskTransform::None, KEY32.to_vec(), "NVMeTLSkey-1:00:VRLbtnN9AQb2WXW3c9+wEf/DRLz0QuLdbYvEhwtdWwNf9LrZ:"),
        (PskTransform::Sha256, KEY32.to_vec(), "NVMeTLSkey-1:01:VRLbtnN9AQb2WXW3c9+wEf/DRLz0QuLdbYvEhwtdWwNf9LrZ:"),
        (
            PskTransform::Sha384,
            key48(),
            "NVMeTLSkey-1:02:VRLbtnN9AQb2WXW3c9+wEf/DRLz0QuLdbYvEhwtdWwP/w0S89ELi3W2LxIcLXVsDn8kXZQ==:",
        ),
    ];
    for (transform, raw, text) in cases {
        let key = TlsKey::new(transform, SecretBytes::new(raw.clone())).unwrap();
        assert_eq!(key.encode().as_str(), text);
        let parsed = TlsKey::parse(text).unwrap();
        assert_eq!(parsed.transform, transform);
        assert_eq!(parsed.key.expose(), &raw[..]);
    }
}

#[test]
fn libnvme_identity_vectors() {
    // (xx, key, encoding, identity): test_data_identity and test_data_identity_compat.
    let cases = [
        (PskTransform::Sha256, KEY32.to_vec(), Encoding::Rfc8446,
         "NVMe1R01 nqn.psk-test-host nqn.psk-test-subsys iSbjiStwJ/1TrTvDlt2fjFmzvsytOJelidNnA+X5lEU="),
        (PskTransform::Sha384, key48(), Encoding::Rfc8446,
         "NVMe1R02 nqn.psk-test-host nqn.psk-test-subsys QhW2+Rp6RzHlNtCslyRxMnwJ11tKKhz8JCAQpQ+XUD8f9td1VeH5h53yz2wKJG1a"),
        (PskTransform::Sha256, KEY32.to_vec(), Encoding::LibnvmeCompat,
         "NVMe1R01 nqn.psk-test-host nqn.psk-test-subsys 66GuqV08TsAGII39teWUfwQwizjv06Jy8jOcX3NAAzM="),
        (PskTransform::Sha384, key48(), Encoding::LibnvmeCompat,
         "NVMe1R02 nqn.psk-test-host nqn.psk-test-subsys RsKmYJ3nAn1ApjjMloJFbAkLPivONDAX/xW327YBUsn2eGShXSjCZvBaOxscLqmz"),
    ];
    for (transform, raw, encoding, expected) in cases {
        let key = TlsKey::new(transform, SecretBytes::new(raw)).unwrap();
        let derived = derive(&key, HOST, SUB, 1, encoding).unwrap();
        assert_eq!(derived.identity.to_string(), expected, "{transform:?} {encoding:?}");
        assert_eq!(PskIdentity::parse(expected).unwrap(), derived.identity);
        assert_eq!(derived.psk.len(), key.key.len());
        // The target resolves the host's identity to the same PSK, and tells the encoding.
        let (found, psk) = psk_for_identity(
            &key,
            &derived.identity,
            &[Encoding::Rfc8446, Encoding::LibnvmeCompat],
        )
        .unwrap();
        assert_eq!(found, encoding);
        assert!(psk.ct_eq(derived.psk.expose()));
    }
}

#[test]
fn rfc8448_expand_label() {
    // RFC 8448 section 3, "derive secret for handshake": PRK = HKDF-Extract(0, 32 zero bytes),
    // HKDF-Expand-Label(PRK, "derived", SHA-256(""), 32).
    let empty_hash = hex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    let out = hkdf_expand_label(
        CipherHash::Sha256,
        &[0u8; 32],
        "derived",
        &empty_hash,
        32,
        Encoding::Rfc8446,
    )
    .unwrap();
    assert_eq!(
        out.expose(),
        &hex("6f2615a108c702c5678f54fc9dbab69716c076189c48250cebeac3576c3611ba")[..]
    );
}

#[test]
fn version0_identity_and_psk_differ_by_encoding() {
    let key = TlsKey::new(PskTransform::Sha256, SecretBytes::from_slice(&KEY32)).unwrap();
    let rfc = derive(&key, HOST, SUB, 0, Encoding::Rfc8446).unwrap();
    let compat = derive(&key, HOST, SUB, 0, Encoding::LibnvmeCompat).unwrap();
    assert_eq!(rfc.identity.to_string(), "NVMe0R01 nqn.psk-test-host nqn.psk-test-subsys");
    assert_eq!(rfc.identity, compat.identity);
    assert!(!rfc.psk.ct_eq(compat.psk.expose()));
    // Version 0 carries no digest: the target takes the first encoding it is told.
    let (encoding, psk) = psk_for_identity(&key, &rfc.identity, &[Encoding::Rfc8446]).unwrap();
    assert_eq!(encoding, Encoding::Rfc8446);
    assert!(psk.ct_eq(rfc.psk.expose()));
}

#[test]
fn untransformed_key_is_its_own_retained_key() {
    let key = TlsKey::new(PskTransform::None, SecretBytes::new(key48())).unwrap();
    assert_eq!(key.cipher(), CipherHash::Sha384);
    assert_eq!(key.retained(HOST, Encoding::Rfc8446).unwrap().expose(), &key48()[..]);
    let transformed = TlsKey::new(PskTransform::Sha384, SecretBytes::new(key48())).unwrap();
    assert_ne!(transformed.retained(HOST, Encoding::Rfc8446).unwrap().expose(), &key48()[..]);
}

#[test]
fn wrong_key_or_hash_is_refused() {
    let key = TlsKey::new(PskTransform::Sha256, SecretBytes::from_slice(&KEY32)).unwrap();
    let host = derive(&key, HOST, SUB, 1, Encoding::Rfc8446).unwrap();
    let mut other = KEY32;
    other[0] ^= 1;
    let wrong = TlsKey::new(PskTransform::Sha256, SecretBytes::from_slice(&other)).unwrap();
    let both = [Encoding::Rfc8446, Encoding::LibnvmeCompat];
    assert_eq!(
        psk_for_identity(&wrong, &host.identity, &both).unwrap_err(),
        PskError::DigestMismatch
    );
    let sha384 = TlsKey::new(PskTransform::Sha384, SecretBytes::new(key48())).unwrap();
    assert!(matches!(
        psk_for_identity(&sha384, &host.identity, &both),
        Err(PskError::HashMismatch { .. })
    ));
}

#[test]
fn malformed_keys_get_typed_errors_without_key_bytes() {
    let good = "NVMeTLSkey-1:01:VRLbtnN9AQb2WXW3c9+wEf/DRLz0QuLdbYvEhwtdWwNf9LrZ:";
    assert_eq!(TlsKey::parse(&good.replace("-1:", "-2:")).unwrap_err(), PskError::Format);
    assert_eq!(TlsKey::parse(&good[..good.len() - 1]).unwrap_err(), PskError::Format);
    assert_eq!(
        TlsKey::parse(&good.replace(":01:", ":03:")).unwrap_err(),
        PskError::UnknownHash("03".into())
    );
    assert!(matches!(
        TlsKey::parse(&good.replace(":01:", ":02:")),
        Err(PskError::KeyLength { .. })
    ));
    assert_eq!(
        TlsKey::parse(&good.replace("VRLb", "VRLc")).unwrap_err(),
        PskError::Body(BodyError::Crc)
    );
    let err = TlsKey::parse(&good.replace("VRLb", "VR*b")).unwrap_err();
    assert_eq!(err, PskError::Body(BodyError::NotBase64));
    for err in [err, PskError::Body(BodyError::Crc)] {
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains("VRL"), "{shown}");
    }
    // Whitespace around a key file's contents is fine.
    assert!(TlsKey::parse(&format!("{good}\n")).is_ok());
}

#[test]
fn malformed_identities_are_refused() {
    for bad in [
        "",
        "NVMe0R01",
        "NVMe0R01 host",
        "NVMe2R01 host sub",
        "NVMe0G01 host sub",
        "NVMe0R03 host sub",
        "NVMe0R01 host sub digest",
        "NVMe1R01 host sub",
        "NVMe1R01 host sub short",
        "NVMe0R01 host sub  ",
        "NVMe0R01  sub",
    ] {
        assert!(PskIdentity::parse(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn nqns_that_cannot_form_an_identity_are_refused() {
    let key = TlsKey::new(PskTransform::Sha256, SecretBytes::from_slice(&KEY32)).unwrap();
    assert!(matches!(derive(&key, "a b", SUB, 0, Encoding::Rfc8446), Err(PskError::Nqn { .. })));
    let long = "n".repeat(224);
    assert!(matches!(derive(&key, &long, SUB, 0, Encoding::Rfc8446), Err(PskError::Nqn { .. })));
    // Two 200 byte NQNs make a version 0 context (the identity) over 255 bytes.
    let host = "h".repeat(200);
    let sub = "s".repeat(200);
    assert!(matches!(
        derive(&key, &host, &sub, 0, Encoding::Rfc8446),
        Err(PskError::ContextTooLong { .. })
    ));
}

fn hex(text: &str) -> Vec<u8> {
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap()).collect()
}
