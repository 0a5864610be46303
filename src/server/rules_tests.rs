//! Table-driven cases of the newer-wins rule (`rules.rs`).

use super::*;

fn id(name: &str, incarnation: u64) -> NodeId {
    NodeId {
        name: name.into(),
        incarnation,
    }
}

#[test]
fn an_insert_replaces_a_record_with_a_smaller_stamp_and_ties_go_by_value() {
    let (a, b) = (id("a", 1), id("b", 1));
    let a2 = id("a", 2);
    // (new stamp, new value, stored stamp, stored value, replaces)
    let cases: Vec<(Stamp, u32, Stamp, u32, bool)> = vec![
        ((2, Some(&a)), 1, (1, Some(&b)), 9, true), // later timestamp
        ((1, Some(&b)), 9, (2, Some(&a)), 1, false), // earlier timestamp
        ((5, Some(&b)), 1, (5, Some(&a)), 9, true), // tie: greater owner name
        ((5, Some(&a)), 9, (5, Some(&b)), 1, false), // tie: smaller owner name
        ((5, Some(&a2)), 1, (5, Some(&a)), 9, true), // tie on name: later incarnation
        ((5, Some(&a)), 7, (5, Some(&a)), 3, true), // same stamp: greater value
        ((5, Some(&a)), 3, (5, Some(&a)), 7, false), // same stamp: smaller value
        ((5, Some(&a)), 7, (5, Some(&a)), 7, true), // the same write again
        ((5, Some(&a)), 7, (5, None), 7, true),     // an identity beats a released index
        ((5, None), 7, (5, Some(&a)), 7, false),
    ];
    for (i, (new, nv, cur, cv, want)) in cases.into_iter().enumerate() {
        assert_eq!(insert_beats_record(new, &nv, cur, &cv), want, "case {i}");
    }
}

#[test]
fn the_rule_is_a_total_order_so_every_node_keeps_the_same_version() {
    // Whatever order two versions arrive in, exactly one of them ends stored.
    let (a, b) = (id("a", 1), id("b", 1));
    let versions: Vec<(Stamp, u32)> = vec![
        ((1, Some(&a)), 1),
        ((1, Some(&a)), 2),
        ((1, Some(&b)), 1),
        ((2, Some(&a)), 0),
        ((2, None), 5),
    ];
    for (x, xv) in &versions {
        for (y, yv) in &versions {
            if (x, xv) == (y, yv) {
                continue;
            }
            let x_then_y = if insert_beats_record(*y, yv, *x, xv) {
                yv
            } else {
                xv
            };
            let y_then_x = if insert_beats_record(*x, xv, *y, yv) {
                xv
            } else {
                yv
            };
            assert_eq!(x_then_y, y_then_x, "{x:?}={xv} against {y:?}={yv}");
        }
    }
}

#[test]
fn a_bag_object_keeps_the_greater_stamp() {
    let (a, b) = (id("a", 1), id("b", 1));
    assert!(bag_object_beats((2, Some(&a)), (1, Some(&b))));
    assert!(bag_object_beats((1, Some(&b)), (1, Some(&a))));
    assert!(!bag_object_beats((1, Some(&a)), (1, Some(&a))));
    assert!(!bag_object_beats((1, Some(&a)), (1, Some(&b))));
}

#[test]
fn a_removal_beats_an_older_or_equal_record_and_a_tombstone_by_its_kind() {
    let (a, b) = (id("a", 1), id("b", 1));
    let delete = |stamp| TombstoneStamp {
        stamp,
        of_version: false,
    };
    let version = |stamp| TombstoneStamp {
        stamp,
        of_version: true,
    };
    // (removal, stored record, tombstone, beats)
    let cases: Vec<(Stamp, Option<Stamp>, Option<TombstoneStamp>, bool)> = vec![
        ((2, Some(&a)), Some((1, Some(&b))), None, true),
        ((2, Some(&a)), Some((2, Some(&a))), None, true), // a tie with a record
        ((2, Some(&a)), Some((2, Some(&b))), None, false),
        ((2, Some(&a)), Some((3, Some(&a))), None, false),
        // The record decides; a tombstone beside it is not consulted.
        (
            (2, Some(&a)),
            Some((1, Some(&a))),
            Some(delete((9, Some(&a)))),
            true,
        ),
        ((2, Some(&a)), None, None, true), // nothing here: it still stops older writes
        ((2, Some(&a)), None, Some(delete((1, Some(&a)))), true),
        ((2, Some(&a)), None, Some(delete((2, Some(&a)))), false), // the same delete again
        ((2, Some(&a)), None, Some(version((2, Some(&a)))), true),
        ((2, Some(&a)), None, Some(delete((3, Some(&a)))), false),
        ((2, Some(&a)), None, Some(version((3, Some(&a)))), false),
    ];
    for (i, (stamp, stored, tombstone, want)) in cases.into_iter().enumerate() {
        assert_eq!(removal_beats(stamp, stored, tombstone), want, "case {i}");
    }
}

#[test]
fn a_record_beats_a_tombstone_when_newer_or_on_its_version_by_value() {
    let a = id("a", 1);
    let enc = |v: u32| postcard::to_stdvec(&v).unwrap();
    let (three, seven) = (enc(3), enc(7));
    // (record stamp, value, tombstone stamp, deleted version's encoding, beats)
    type Case<'a> = (Stamp<'a>, u32, Stamp<'a>, Option<&'a [u8]>, bool);
    let cases: Vec<Case> = vec![
        ((3, Some(&a)), 1, (2, Some(&a)), None, true),
        ((1, Some(&a)), 1, (2, Some(&a)), None, false),
        ((2, Some(&a)), 9, (2, Some(&a)), None, false), // a delete wins every tie
        ((2, Some(&a)), 7, (2, Some(&a)), Some(&three), true), // beats the removed version
        ((2, Some(&a)), 3, (2, Some(&a)), Some(&three), false), // is the removed version
        ((2, Some(&a)), 3, (2, Some(&a)), Some(&seven), false),
        ((1, Some(&a)), 9, (2, Some(&a)), Some(&three), false),
    ];
    for (i, (stamp, value, t, deleted, want)) in cases.into_iter().enumerate() {
        assert_eq!(
            beats_tombstone_stamp(stamp, &value, t, deleted),
            want,
            "case {i}"
        );
    }
}

#[test]
fn a_refusal_mark_depends_on_key_stamp_and_writer_only() {
    let (a, a2) = (id("a", 1), id("a", 2));
    let m = refusal_mark(&"k", 5, Some(&a));
    assert_eq!(m, refusal_mark(&"k", 5, Some(&a.clone())));
    let others = [
        refusal_mark(&"j", 5, Some(&a)),
        refusal_mark(&"k", 6, Some(&a)),
        refusal_mark(&"k", 5, Some(&a2)),
        refusal_mark(&"k", 5, None),
    ];
    assert!(others.iter().all(|o| *o != m), "{m:x} {others:x?}");
}
