use super::WORKLOAD_FIELDS;
use super::limits::LIMIT_FIELDS;
use super::names::check_name;
use super::shape::closest;

#[test]
fn names_follow_the_pattern() {
    for good in ["a", "counter", "0x-1", &"a".repeat(63)] {
        assert!(check_name(good).is_ok(), "{good:?}");
    }
    for bad in ["", "-a", "Counter", "a_b", "a.b", "é", &"a".repeat(64)] {
        assert!(check_name(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn typos_suggest_the_closest_field() {
    assert_eq!(closest("modul", WORKLOAD_FIELDS), Some("module"));
    assert_eq!(closest("timeslice", LIMIT_FIELDS), Some("time-slice"));
    assert_eq!(closest("zzzzzz", WORKLOAD_FIELDS), None);
}
