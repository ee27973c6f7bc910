use super::*;
use proptest::prelude::*;

const A: HostId = [0xa; 16];
const B: HostId = [0xb; 16];
const C: HostId = [0xc; 16];

fn data(current: u64, other: u64) -> Vec<u8> {
    let mut d = current.to_le_bytes().to_vec();
    d.extend_from_slice(&other.to_le_bytes());
    d
}

fn register(r: &mut Reservations, h: &HostId, key: u64) -> Status {
    r.register(h, 0, &data(0, key))
}

fn acquire(r: &mut Reservations, h: &HostId, key: u64, kind: u32) -> Status {
    r.acquire(h, kind << 8, &data(key, 0))
}

fn preempt(r: &mut Reservations, h: &HostId, key: u64, victim: u64, kind: u32) -> Status {
    r.acquire(h, (kind << 8) | 1, &data(key, victim))
}

fn release(r: &mut Reservations, h: &HostId, key: u64, kind: u32) -> Status {
    r.release(h, kind << 8, &data(key, 0))
}

fn may(r: &Reservations, h: &HostId, a: Access) -> bool {
    r.check(h, a).is_ok()
}

/// The specification's table of what each host may do under each type (Base 2.0, "Command
/// Behavior in the Presence of a Reservation"): holder, registrant, other host; read, write.
#[test]
fn each_type_admits_whom_the_specification_says() {
    #[rustfmt::skip]
    let table: [(u32, [bool; 6]); 6] = [
        //        holder r/w    registrant r/w   other r/w
        (1, [true, true,  true,  false, true,  false]),
        (2, [true, true,  false, false, false, false]),
        (3, [true, true,  true,  true,  true,  false]),
        (4, [true, true,  true,  true,  false, false]),
        (5, [true, true,  true,  true,  true,  false]),
        (6, [true, true,  true,  true,  false, false]),
    ];
    for (kind, want) in table {
        let mut r = Reservations::default();
        assert_eq!(register(&mut r, &A, 1), status::SUCCESS);
        assert_eq!(register(&mut r, &B, 2), status::SUCCESS);
        assert!(may(&r, &C, Access::Write), "nothing held: everyone writes");
        assert_eq!(acquire(&mut r, &A, 1, kind), status::SUCCESS);
        assert!(r.held());
        let got = [
            may(&r, &A, Access::Read),
            may(&r, &A, Access::Write),
            may(&r, &B, Access::Read),
            may(&r, &B, Access::Write),
            may(&r, &C, Access::Read),
            may(&r, &C, Access::Write),
        ];
        assert_eq!(got, want, "type {kind}");
        assert_eq!(r.check(&C, Access::Write), Err(RESERVATION_CONFLICT));
    }
}

#[test]
fn opcodes_fall_into_the_read_and_write_groups() {
    assert_eq!(Access::of_opcode(io::READ), Some(Access::Read));
    for op in [io::WRITE, io::WRITE_ZEROES, io::DSM, io::FLUSH] {
        assert_eq!(Access::of_opcode(op), Some(Access::Write));
    }
    assert_eq!(Access::of_opcode(0x0d), None, "reservation commands are checked by themselves");
}

#[test]
fn registration_keys_are_checked_and_the_generation_counts_changes() {
    let mut r = Reservations::default();
    assert_eq!(register(&mut r, &A, 7), status::SUCCESS);
    assert_eq!(r.generation(), 1);
    assert_eq!(register(&mut r, &A, 7), status::SUCCESS, "the same key again");
    assert_eq!(register(&mut r, &A, 8), RESERVATION_CONFLICT, "another key");
    let g = r.generation();
    // Replace with the wrong current key: refused, nothing counted.
    assert_eq!(r.register(&A, 2, &data(9, 10)), RESERVATION_CONFLICT);
    assert_eq!(r.generation(), g);
    assert_eq!(r.register(&A, 2, &data(7, 10)), status::SUCCESS);
    // Ignore Existing Key replaces whatever the key.
    assert_eq!(r.register(&A, 2 | 1 << 3, &data(0, 11)), status::SUCCESS);
    assert_eq!(r.register(&A, 1, &data(10, 0)), RESERVATION_CONFLICT, "old key");
    assert_eq!(r.register(&A, 1, &data(11, 0)), status::SUCCESS);
    assert_eq!(r.register(&A, 1, &data(11, 0)), RESERVATION_CONFLICT, "not registered now");
    assert_eq!(r.register(&B, 2, &data(0, 1)), RESERVATION_CONFLICT, "replace unregistered");
    // CPTPL 01b is reserved; 11b (what Linux's pr_ops always sends) is taken and, where the
    // table cannot be kept, has no effect.
    assert_eq!(r.register(&B, 1 << 30, &data(0, 1)), status::INVALID_FIELD);
    assert_eq!(r.register(&B, 3 << 30, &data(0, 1)), status::SUCCESS);
    assert!(!r.ptpl());
    assert_eq!(r.report(1, 64).unwrap()[9], 0, "PTPLS");
    assert_eq!(r.register(&B, 2 << 30, &data(0, 1)), status::SUCCESS);
    assert_eq!(r.register(&B, 5, &data(0, 1)), status::INVALID_FIELD, "action 5");
    assert_eq!(r.register(&C, 0, &[0; 15]), status::SGL_DATA_LENGTH_INVALID);
}

#[test]
fn registrations_stop_at_their_limit() {
    let mut r = Reservations::default();
    for i in 0..REGISTRANTS_DEFAULT {
        let mut h = [0u8; 16];
        h[..8].copy_from_slice(&(i as u64).to_le_bytes());
        assert_eq!(register(&mut r, &h, 1), status::SUCCESS);
    }
    assert_eq!(register(&mut r, &[0xff; 16], 1), status::INTERNAL);
    let report = r.report(1, 4096).unwrap();
    assert_eq!(u16::from_le_bytes([report[5], report[6]]) as usize, REGISTRANTS_DEFAULT);
    // One leaves, another may come.
    assert_eq!(r.register(&[0; 16], 1, &data(1, 0)), status::SUCCESS);
    assert_eq!(register(&mut r, &[0xff; 16], 1), status::SUCCESS);
    let mut one = Reservations::with_limit(1);
    assert_eq!(register(&mut one, &A, 1), status::SUCCESS);
    assert_eq!(register(&mut one, &B, 1), status::INTERNAL);
    assert_eq!(one.report_max(), 128);
}

#[test]
fn acquire_needs_the_registrants_key_and_conflicts_with_another_holder() {
    let mut r = Reservations::default();
    assert_eq!(acquire(&mut r, &A, 1, 1), RESERVATION_CONFLICT, "not registered");
    register(&mut r, &A, 1);
    register(&mut r, &B, 2);
    assert_eq!(acquire(&mut r, &A, 9, 1), RESERVATION_CONFLICT, "wrong key");
    assert_eq!(acquire(&mut r, &A, 1, 7), status::INVALID_FIELD, "type 7");
    assert_eq!(r.acquire(&A, (1 << 8) | (1 << 3), &data(1, 0)), status::INVALID_FIELD, "IEKEY");
    let g = r.generation();
    assert_eq!(acquire(&mut r, &A, 1, 1), status::SUCCESS);
    assert_eq!(r.generation(), g, "acquire does not count");
    assert_eq!(acquire(&mut r, &A, 1, 1), status::SUCCESS, "again, same type");
    assert_eq!(acquire(&mut r, &A, 1, 2), RESERVATION_CONFLICT, "again, another type");
    assert_eq!(acquire(&mut r, &B, 2, 1), RESERVATION_CONFLICT, "held by A");
}

#[test]
fn all_registrants_types_are_held_by_every_registrant_until_the_last_leaves() {
    let mut r = Reservations::default();
    register(&mut r, &A, 1);
    register(&mut r, &B, 2);
    assert_eq!(acquire(&mut r, &A, 1, 5), status::SUCCESS);
    assert_eq!(acquire(&mut r, &B, 2, 5), status::SUCCESS, "B holds it already");
    let report = r.report(1, 4096).unwrap();
    assert_eq!(report[64 + 2], 1, "A holds");
    assert_eq!(report[128 + 2], 1, "B holds");
    r.register(&A, 1, &data(1, 0));
    assert!(r.held(), "B still holds it");
    assert!(may(&r, &B, Access::Write));
    assert!(!may(&r, &A, Access::Write), "A left");
    r.register(&B, 1, &data(2, 0));
    assert!(!r.held(), "the last registrant took it along");
    assert!(may(&r, &A, Access::Write));
}

#[test]
fn a_holder_that_unregisters_ends_its_reservation() {
    let mut r = Reservations::default();
    register(&mut r, &A, 1);
    register(&mut r, &B, 2);
    acquire(&mut r, &A, 1, 2);
    assert!(!may(&r, &B, Access::Read));
    assert_eq!(r.register(&A, 1, &data(1, 0)), status::SUCCESS);
    assert!(!r.held());
    assert!(may(&r, &B, Access::Read));
}

#[test]
fn preempt_takes_the_reservation_and_drops_the_preempted_registrations() {
    let mut r = Reservations::default();
    register(&mut r, &A, 1);
    register(&mut r, &B, 2);
    register(&mut r, &C, 1);
    acquire(&mut r, &A, 1, 1);
    let g = r.generation();
    // B preempts the holder's key: A and C (same key) are gone, B holds Exclusive Access.
    assert_eq!(preempt(&mut r, &B, 2, 1, 2), status::SUCCESS);
    assert_eq!(r.generation(), g + 1);
    assert!(may(&r, &B, Access::Write));
    assert!(!may(&r, &A, Access::Read));
    assert_eq!(acquire(&mut r, &A, 1, 1), RESERVATION_CONFLICT, "A is no registrant now");
    let report = r.report(1, 4096).unwrap();
    assert_eq!(report[4], 2);
    assert_eq!(u16::from_le_bytes([report[5], report[6]]), 1);
    let st = r.status();
    assert_eq!((st.rtype, st.generation, st.registrants), (Some(2), g + 1, vec![(B, true)]));
    // A key nobody has: conflict; key 0 against a one-holder type: invalid field.
    register(&mut r, &A, 5);
    assert_eq!(preempt(&mut r, &A, 5, 99, 1), RESERVATION_CONFLICT);
    assert_eq!(preempt(&mut r, &A, 5, 0, 1), status::INVALID_FIELD);
    // Another registrant's key that is not the holder's: that registrant goes, B keeps it.
    register(&mut r, &C, 6);
    assert_eq!(preempt(&mut r, &A, 5, 6, 1), status::SUCCESS);
    assert!(r.registrant(&C).is_none());
    assert_eq!(r.report(1, 64).unwrap()[4], 2, "B's reservation unchanged");
    // The holder changes its own type by preempting its own key.
    assert_eq!(preempt(&mut r, &B, 2, 2, 1), status::SUCCESS);
    assert_eq!(r.report(1, 64).unwrap()[4], 1);
    assert!(may(&r, &A, Access::Read));
    // Preempt and abort (action 2) does the same.
    assert_eq!(r.acquire(&A, (3 << 8) | 2, &data(5, 2)), status::SUCCESS);
    assert!(r.holds(&A) && r.registrant(&B).is_none());
}

#[test]
fn preempt_without_a_reservation_or_of_all_registrants() {
    let mut r = Reservations::default();
    register(&mut r, &A, 1);
    register(&mut r, &B, 2);
    assert_eq!(preempt(&mut r, &A, 1, 2, 1), status::SUCCESS, "nothing held: B goes");
    assert!(!r.held() && r.registrant(&B).is_none());
    register(&mut r, &B, 2);
    register(&mut r, &C, 3);
    acquire(&mut r, &B, 2, 6);
    // Key 0 against all-registrants: everyone else goes, A holds the new type.
    assert_eq!(preempt(&mut r, &A, 1, 0, 1), status::SUCCESS);
    assert!(r.holds(&A));
    assert_eq!(r.registrants.len(), 1);
    register(&mut r, &B, 2);
    acquire(&mut r, &A, 1, 1);
    assert_eq!(release(&mut r, &A, 1, 1), status::SUCCESS);
    acquire(&mut r, &A, 1, 5);
    // A key against all-registrants: that key's registrants go, the reservation stays.
    assert_eq!(preempt(&mut r, &A, 1, 2, 1), status::SUCCESS);
    assert!(r.registrant(&B).is_none());
    assert_eq!(r.report(1, 64).unwrap()[4], 5);
}

#[test]
fn release_and_clear() {
    let mut r = Reservations::default();
    register(&mut r, &A, 1);
    register(&mut r, &B, 2);
    acquire(&mut r, &A, 1, 1);
    assert_eq!(release(&mut r, &B, 2, 1), status::SUCCESS, "not the holder: no effect");
    assert!(r.held());
    assert_eq!(release(&mut r, &A, 9, 1), RESERVATION_CONFLICT, "wrong key");
    assert_eq!(release(&mut r, &A, 1, 2), status::INVALID_FIELD, "wrong type");
    let g = r.generation();
    assert_eq!(release(&mut r, &A, 1, 1), status::SUCCESS);
    assert!(!r.held());
    assert_eq!(r.generation(), g, "release does not count");
    assert_eq!(release(&mut r, &A, 1, 1), status::SUCCESS, "nothing held");
    acquire(&mut r, &B, 2, 2);
    assert_eq!(r.release(&C, 1, &data(0, 0)), RESERVATION_CONFLICT, "clear needs a registrant");
    assert_eq!(r.release(&A, 1, &data(1, 0)), status::SUCCESS, "any registrant clears");
    assert!(!r.held());
    assert!(r.registrants.is_empty());
    assert_eq!(r.generation(), g + 1);
    assert_eq!(r.release(&A, 1 << 3, &data(1, 0)), status::INVALID_FIELD, "IEKEY");
}

/// A table with `hosts` registered in order, under their keys.
fn registered(hosts: &[(HostId, u64)]) -> Reservations {
    let mut r = Reservations::default();
    for (h, key) in hosts {
        assert_eq!(register(&mut r, h, *key), status::SUCCESS);
    }
    r
}

fn notices(r: &mut Reservations) -> Vec<(HostId, NoticeKind)> {
    let mut n: Vec<_> = r.take_notices().into_iter().map(|n| (n.host, n.kind)).collect();
    n.sort_by_key(|(h, _)| *h);
    n
}

#[test]
fn a_preempt_tells_the_hosts_it_unregistered_and_no_one_else() {
    use NoticeKind::*;
    let mut r = registered(&[(A, 1), (B, 2), (C, 1)]);
    assert!(notices(&mut r).is_empty(), "registering tells nobody");
    acquire(&mut r, &A, 1, 1);
    assert!(notices(&mut r).is_empty(), "acquiring tells nobody");
    // B takes the holder's key (A's and C's): both hear their registration was preempted.
    assert_eq!(preempt(&mut r, &B, 2, 1, 1), status::SUCCESS);
    assert_eq!(notices(&mut r), vec![(A, RegistrationPreempted), (C, RegistrationPreempted)]);
    // A failed preempt tells nobody.
    assert_eq!(preempt(&mut r, &B, 2, 77, 1), RESERVATION_CONFLICT);
    assert!(notices(&mut r).is_empty());
    // The holder changing the type with its own key: the registrants left hear it released.
    register(&mut r, &A, 3);
    assert_eq!(preempt(&mut r, &B, 2, 2, 3), status::SUCCESS);
    assert_eq!(notices(&mut r), vec![(A, ReservationReleased)]);
    assert_eq!(preempt(&mut r, &B, 2, 2, 3), status::SUCCESS);
    assert!(notices(&mut r).is_empty(), "the same type again: nothing released");
    // Key 0 against all-registrants: every other registrant's registration goes.
    register(&mut r, &C, 4);
    release(&mut r, &B, 2, 3);
    notices(&mut r);
    acquire(&mut r, &A, 3, 5);
    assert_eq!(preempt(&mut r, &A, 3, 0, 1), status::SUCCESS);
    assert_eq!(notices(&mut r), vec![(B, RegistrationPreempted), (C, RegistrationPreempted)]);
}

#[test]
fn releases_tell_the_other_registrants_only_where_the_type_admits_them() {
    use NoticeKind::*;
    for (kind, told) in [(1, false), (2, false), (3, true), (4, true), (5, true), (6, true)] {
        let mut r = registered(&[(A, 1), (B, 2), (C, 3)]);
        acquire(&mut r, &A, 1, kind);
        assert_eq!(release(&mut r, &A, 1, kind), status::SUCCESS);
        let want =
            if told { vec![(B, ReservationReleased), (C, ReservationReleased)] } else { vec![] };
        assert_eq!(notices(&mut r), want, "type {kind} released");
        // The holder unregistering ends a one-holder reservation: the same rule.
        acquire(&mut r, &A, 1, kind);
        notices(&mut r);
        assert_eq!(r.register(&A, 1, &data(1, 0)), status::SUCCESS);
        let want = if told && kind < 5 {
            vec![(B, ReservationReleased), (C, ReservationReleased)]
        } else {
            vec![]
        };
        assert_eq!(notices(&mut r), want, "type {kind}: the holder unregistered");
    }
    // A release by a host that does not hold it changes nothing and tells nobody.
    let mut r = registered(&[(A, 1), (B, 2)]);
    acquire(&mut r, &A, 1, 3);
    assert_eq!(release(&mut r, &B, 2, 3), status::SUCCESS);
    assert!(notices(&mut r).is_empty());
    assert_eq!(release(&mut r, &A, 1, 4), status::INVALID_FIELD, "wrong type");
    assert!(notices(&mut r).is_empty());
}

#[test]
fn a_clear_tells_every_other_registrant_its_reservation_was_preempted() {
    use NoticeKind::*;
    let mut r = registered(&[(A, 1), (B, 2), (C, 3)]);
    acquire(&mut r, &B, 2, 1);
    assert_eq!(r.release(&C, 1, &data(3, 0)), status::SUCCESS);
    assert_eq!(notices(&mut r), vec![(A, ReservationPreempted), (B, ReservationPreempted)]);
    assert_eq!(r.release(&C, 1, &data(3, 0)), RESERVATION_CONFLICT, "C is no registrant now");
    assert!(notices(&mut r).is_empty());
}

#[test]
fn the_report_is_the_extended_structure_cut_to_the_buffer() {
    let mut r = Reservations::default();
    assert_eq!(r.report(0, 4096), Err(HOST_ID_INCONSISTENT));
    register(&mut r, &A, 0x1122_3344_5566_7788);
    register(&mut r, &B, 2);
    acquire(&mut r, &B, 2, 3);
    let rep = r.report(1, 4096).unwrap();
    assert_eq!(rep.len(), 4096);
    assert_eq!(u32::from_le_bytes(rep[0..4].try_into().unwrap()), 2, "generation");
    assert_eq!(rep[4], 3, "type");
    assert_eq!(u16::from_le_bytes([rep[5], rep[6]]), 2, "registrants");
    assert_eq!(rep[9], 0, "not persisted");
    let a = &rep[64..128];
    assert_eq!(u16::from_le_bytes([a[0], a[1]]), 0xffff);
    assert_eq!(a[2], 0, "A does not hold");
    assert_eq!(u64::from_le_bytes(a[8..16].try_into().unwrap()), 0x1122_3344_5566_7788);
    assert_eq!(&a[16..32], &A);
    assert_eq!(rep[128 + 2], 1, "B holds");
    assert_eq!(&rep[128 + 16..128 + 32], &B);
    assert!(rep[192..].iter().all(|b| *b == 0));
    // A short buffer gets the start, with the full count.
    let short = r.report(1, 100).unwrap();
    assert_eq!(short.len(), 100);
    assert_eq!(&short[..], &rep[..100]);
}

const NGUID: [u8; 16] = [0x5a; 16];
const KA: u64 = 0xa1;
const KB: u64 = 0xb2;

/// Everything a table decides, to compare two: its report and each host's verdicts.
fn decisions(r: &Reservations) -> (Vec<u8>, Vec<(bool, bool)>) {
    let verdicts =
        [A, B, C].iter().map(|h| (may(r, h, Access::Read), may(r, h, Access::Write))).collect();
    (r.report(1, 64 + 64 * r.registrants.len()).unwrap(), verdicts)
}

#[test]
fn ptpl_turns_on_and_off_where_the_table_can_be_kept_and_the_kept_table_decides_the_same() {
    let mut r = Reservations::with_limit(100).persistent();
    assert!(r.can_persist() && !r.ptpl());
    assert_eq!(r.register(&A, 3 << 30, &data(0, KA)), status::SUCCESS);
    assert!(r.ptpl());
    assert_eq!(r.report(1, 64).unwrap()[9], 1, "PTPLS");
    register(&mut r, &B, KB);
    assert_eq!(acquire(&mut r, &A, KA, 4), status::SUCCESS);
    let kept = r.encode(&NGUID);
    let back = Reservations::decode(&kept, &NGUID, 100).unwrap();
    assert_eq!(decisions(&back), decisions(&r));
    assert_eq!(back.encode(&NGUID), kept, "canonical");
    assert!(back.ptpl() && back.can_persist());
    // A failed Register changes nothing, PTPL included.
    assert_eq!(r.register(&B, 2 << 30, &data(0, 999)), RESERVATION_CONFLICT);
    assert!(r.ptpl());
    assert_eq!(r.register(&B, 2 << 30, &data(0, KB)), status::SUCCESS);
    assert!(!r.ptpl());
    // While PTPL is on, the kept table's bound applies whatever the limit.
    let mut r = Reservations::with_limit(100).persistent();
    r.register(&A, 3 << 30, &data(0, 1));
    for i in 1..PTPL_REGISTRANTS_MAX {
        let mut h = [9u8; 16];
        h[..8].copy_from_slice(&(i as u64).to_le_bytes());
        assert_eq!(register(&mut r, &h, 1), status::SUCCESS);
    }
    assert_eq!(register(&mut r, &C, 1), status::INTERNAL, "the kept table is full");
    assert!(r.encode(&NGUID).len() * 4 / 3 + 4 <= 3072, "fits one pool configuration entry");
    r.register(&A, 2 << 30, &data(1, 1));
    assert_eq!(register(&mut r, &C, 1), status::SUCCESS, "PTPL off: the limit again");
    assert_eq!(r.register(&C, 3 << 30, &data(0, 1)), status::INVALID_FIELD, "too many to keep");
}

#[test]
fn set_features_turns_ptpl_on_and_off_where_the_table_can_be_kept() {
    let mut r = Reservations::default();
    assert_eq!(r.set_ptpl(true), status::INVALID_FIELD, "nowhere to keep it");
    assert_eq!(r.set_ptpl(false), status::SUCCESS);
    let mut r = Reservations::with_limit(PTPL_REGISTRANTS_MAX + 2).persistent();
    register(&mut r, &A, 1);
    let g = r.generation();
    assert_eq!(r.set_ptpl(true), status::SUCCESS);
    assert!(r.ptpl() && r.generation() == g, "PTPL is not a registration change");
    assert_eq!(r.set_ptpl(false), status::SUCCESS);
    assert!(!r.ptpl());
    for i in 0..=PTPL_REGISTRANTS_MAX as u8 {
        assert_eq!(register(&mut r, &[100 + i; 16], 2), status::SUCCESS);
    }
    assert_eq!(r.set_ptpl(true), status::INVALID_FIELD, "more registrations than a kept table");
    assert!(!r.ptpl());
}

#[test]
fn a_kept_table_is_refused_when_it_is_not_this_namespaces_or_not_whole() {
    let mut r = Reservations::with_limit(8).persistent();
    r.register(&A, 3 << 30, &data(0, KA));
    acquire(&mut r, &A, KA, 1);
    let kept = r.encode(&NGUID);
    let decode = |b: &[u8]| Reservations::decode(b, &NGUID, 8);
    assert_eq!(
        Reservations::decode(&kept, &[1; 16], 8).err(),
        Some(ResvDecodeError::OtherNamespace)
    );
    assert_eq!(
        decode(&kept[..kept.len() - 1]).err(),
        Some(ResvDecodeError::Length(kept.len() - 1))
    );
    let mut bad = kept.clone();
    bad[0] = 9;
    assert_eq!(decode(&bad).err(), Some(ResvDecodeError::Version(9)));
    let mut bad = kept.clone();
    bad[4] ^= 1; // a holder that is no registrant
    assert!(matches!(decode(&bad), Err(ResvDecodeError::Inconsistent(_))));
    let mut bad = kept.clone();
    bad[2] = 5; // an all-registrants type held by one host
    assert!(matches!(decode(&bad), Err(ResvDecodeError::Inconsistent(_))));
    // A table kept under a larger limit keeps all its registrations under a smaller one.
    let mut big = Reservations::with_limit(8).persistent();
    big.register(&A, 3 << 30, &data(0, 1));
    register(&mut big, &B, 2);
    register(&mut big, &C, 3);
    let small = Reservations::decode(&big.encode(&NGUID), &NGUID, 1).unwrap();
    assert_eq!(decisions(&small), decisions(&big));
}

#[derive(Debug, Clone)]
enum Op {
    Register(usize, u32, u64, u64),
    Acquire(usize, u32, u64, u64),
    Release(usize, u32, u64),
}

fn op() -> impl Strategy<Value = Op> {
    let host = 0..3usize;
    let key = 0..3u64;
    prop_oneof![
        (host.clone(), 0..4u32, key.clone(), key.clone()).prop_map(|(h, a, c, n)| Op::Register(
            h,
            a | if n == 2 { 1 << 3 } else { 0 },
            c,
            n
        )),
        (host.clone(), 0..3u32, 1..7u32, key.clone(), key.clone())
            .prop_map(|(h, a, t, c, p)| Op::Acquire(h, a | (t << 8), c, p)),
        (host, 0..2u32, 1..7u32, key).prop_map(|(h, a, t, c)| Op::Release(h, a | (t << 8), c)),
    ]
}

proptest! {
    /// Any sequence of commands from three hosts keeps the invariants (asserted inside each
    /// command), a holder may always do everything, and the generation moves only on a
    /// successful Register, Preempt or Clear.
    #[test]
    fn random_commands_keep_the_invariants(ops in proptest::collection::vec(op(), 1..60)) {
        let hosts = [A, B, C];
        let mut r = Reservations::with_limit(REGISTRANTS_DEFAULT).persistent();
        for op in ops {
            let g = r.generation();
            let registered: Vec<HostId> = r.registrants.iter().map(|x| x.host).collect();
            let issuer = match op {
                Op::Register(h, ..) | Op::Acquire(h, ..) | Op::Release(h, ..) => hosts[h],
            };
            let (st, counts) = match op {
                Op::Register(h, cdw10, c, n) => (r.register(&hosts[h], cdw10, &data(c, n)), true),
                Op::Acquire(h, cdw10, c, p) => {
                    (r.acquire(&hosts[h], cdw10, &data(c, p)), cdw10 & 7 != 0)
                }
                Op::Release(h, cdw10, c) => (r.release(&hosts[h], cdw10, &data(c, 0)), cdw10 & 7 == 1),
            };
            let want = if st == status::SUCCESS && counts { g.wrapping_add(1) } else { g };
            prop_assert_eq!(r.generation(), want);
            // Notices go to hosts registered before the command, never to its issuer, at most
            // one each, and only from a command that succeeded.
            let told = r.take_notices();
            prop_assert!(st == status::SUCCESS || told.is_empty());
            let mut seen = std::collections::HashSet::new();
            for n in &told {
                prop_assert!(n.host != issuer && registered.contains(&n.host), "{:?}", n);
                prop_assert!(seen.insert(n.host), "two notices for one host: {:?}", told);
            }
            // What is kept decides the same after a restart.
            let back = Reservations::decode(&r.encode(&NGUID), &NGUID, REGISTRANTS_DEFAULT).unwrap();
            prop_assert_eq!(decisions(&back), decisions(&r));
            for h in &hosts {
                if r.holds(h) {
                    prop_assert!(may(&r, h, Access::Read) && may(&r, h, Access::Write));
                }
                if !r.held() {
                    prop_assert!(may(&r, h, Access::Write));
                }
            }
        }
    }
}
