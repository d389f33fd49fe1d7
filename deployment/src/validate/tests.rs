use super::WORKLOAD_FIELDS;
use super::limits::{LIMIT_FIELDS, parse_size};
use super::names::check_name;
use super::shape::closest;

#[test]
fn sizes_use_binary_units() {
    assert_eq!(parse_size("16MiB"), Ok(16 << 20));
    assert_eq!(parse_size("16 mib"), Ok(16 << 20));
    assert_eq!(parse_size("64KiB"), Ok(65536));
    assert_eq!(parse_size("1GiB"), Ok(1 << 30));
    assert_eq!(parse_size("4096"), Ok(4096));
    assert_eq!(parse_size("4096B"), Ok(4096));
    assert!(parse_size("16MB").is_err_and(|why| why.contains("ambiguous")));
    assert!(parse_size("MiB").is_err());
    assert!(parse_size("1.5MiB").is_err());
    assert!(parse_size("-1MiB").is_err());
    assert!(parse_size("99999999999999GiB").is_err_and(|why| why.contains("too large")));
}

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
