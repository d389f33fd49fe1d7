//! The `wasi:keyvalue` calls of the host-calls target: a bucket's get, set, delete, exists,
//! list and increment with arbitrary keys and values, checked against the model's visible keys
//! and the limits.

use super::*;

pub(super) fn keyvalue(u: &mut Unstructured<'_>, host: &mut DeviceState, model: &mut Model) {
    let bucket: Resource<Bucket> = handle(u, model);
    let rep = bucket.rep();
    let name = match model.handles.get(&rep) {
        Some(Handle::Bucket(name)) => Some(name.clone()),
        _ => None,
    };
    let key = match int(u, 0..=3) {
        0 => "k".repeat(pick(u, &[16usize, 17, 300])),
        _ => pick(u, &["a", "b", "c", "d", "e", "f", "g", "h", "i", "n", ""]).to_owned(),
    };
    let full = (name.clone().unwrap_or_default(), key.clone());
    match int(u, 0..=5) {
        0 => {
            let result = HostBucket::get(host, bucket, key);
            match &name {
                Some(_) => assert_eq!(result.ok(), Some(model.visible.get(&full).cloned())),
                None => assert!(result.is_err()),
            }
        }
        1 => {
            let result = HostBucket::exists(host, bucket, key);
            match &name {
                Some(_) => assert_eq!(result.ok(), Some(model.visible.contains_key(&full))),
                None => assert!(result.is_err()),
            }
        }
        2 => {
            let value = match int(u, 0..=3) {
                0 => vec![b'v'; pick(u, &[64usize, 65, 100_000])],
                1 => pick(u, &[&b"7"[..], b" 41 ", b"18446744073709551615", b"x"]).to_vec(),
                _ => buffer(u),
            };
            let result = HostBucket::set(host, bucket, key, value.clone());
            if name.is_none() {
                assert!(result.is_err());
                return;
            }
            let expected = writable(model, &full, Some(value.len()));
            assert_eq!(result.is_ok(), expected, "set {full:?}: {result:?}");
            if result.is_ok() {
                model.visible.insert(full, value);
            }
        }
        3 => {
            let result = HostBucket::delete(host, bucket, key);
            if name.is_none() {
                assert!(result.is_err());
                return;
            }
            assert_eq!(result.is_ok(), full.1.len() <= LIMITS.max_key_bytes);
            if result.is_ok() {
                model.visible.remove(&full);
            }
        }
        4 => {
            let delta = pick(u, &[0u64, 1, 5, u64::MAX]);
            let result = AtomicsHost::increment(host, bucket, key, delta);
            if name.is_none() {
                assert!(result.is_err());
                return;
            }
            let current = match model.visible.get(&full) {
                None => Some(0),
                Some(bytes) => std::str::from_utf8(bytes)
                    .ok()
                    .and_then(|t| t.trim().parse::<u64>().ok()),
            };
            let next = current.and_then(|c| c.checked_add(delta));
            let expected = next.filter(|n| writable(model, &full, Some(n.to_string().len())));
            assert_eq!(
                result.as_ref().ok(),
                expected.as_ref(),
                "increment {full:?}: {result:?}"
            );
            if let Some(n) = expected {
                model.visible.insert(full, n.to_string().into_bytes());
            }
        }
        _ => {
            let Some(bucket_name) = name else {
                assert!(HostBucket::list_keys(host, bucket, None).is_err());
                return;
            };
            if one_in(u, 4) {
                let cursor = pick(u, &[0u64, 1, 100, u64::MAX]);
                let _ = HostBucket::list_keys(host, Resource::new_borrow(rep), Some(cursor));
                return;
            }
            let mut keys = Vec::new();
            let mut cursor = None;
            for _ in 0..100 {
                let page = HostBucket::list_keys(host, Resource::new_borrow(rep), cursor)
                    .expect("listing a live bucket");
                keys.extend(page.keys);
                cursor = page.cursor;
                if cursor.is_none() {
                    break;
                }
            }
            let expected: Vec<String> = model
                .visible
                .keys()
                .filter(|(b, _)| *b == bucket_name)
                .map(|(_, k)| k.clone())
                .collect();
            assert_eq!(keys, expected, "list-keys of bucket {bucket_name:?}");
        }
    }
}

/// Whether the host must accept writing `full` (a value of `len` bytes).
fn writable(model: &Model, full: &(String, String), len: Option<usize>) -> bool {
    if full.1.len() > LIMITS.max_key_bytes {
        return false;
    }
    match len {
        Some(len) if len > LIMITS.max_value_bytes => false,
        Some(_) => model.visible.contains_key(full) || model.visible.len() < LIMITS.max_keys,
        None => true,
    }
}
