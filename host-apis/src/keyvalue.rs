//! `wasi:keyvalue/store` and `atomics`: a workload's buckets, read through the pending writes
//! of the current call and the committed data shared by the workload's instances.

use std::collections::{BTreeMap, BTreeSet};

use wasmtime::component::Resource;

use crate::DeviceState;
use crate::bindings::wasi::keyvalue::store::{Error, Host, HostBucket, KeyResponse};
use crate::state::lock;

/// A key of a workload's key-value data: (bucket, key).
pub type KvKey = (String, String);

/// A workload's committed key-value data.
pub type KvMap = BTreeMap<KvKey, Vec<u8>>;

/// An open bucket, as a guest holds it.
#[derive(Debug, Clone)]
pub struct Bucket {
    name: String,
}

/// Name of the bucket that `""` and `"default"` open.
pub const DEFAULT_BUCKET: &str = "default";

/// Keys per page of `list-keys`.
const PAGE: usize = 100;

impl DeviceState {
    fn bucket_name(&self, bucket: &Resource<Bucket>) -> Result<String, Error> {
        self.table
            .get(bucket)
            .map(|b| b.name.clone())
            .map_err(|e| Error::Other(format!("bad bucket handle: {e}")))
    }

    fn read(&self, key: &KvKey) -> Option<Vec<u8>> {
        match self.pending.kv.get(key) {
            Some(pending) => pending.clone(),
            None => lock(&self.committed).get(key).cloned(),
        }
    }

    fn write(&mut self, key: KvKey, value: Option<Vec<u8>>) -> Result<(), Error> {
        if key.1.len() > self.limits.max_key_bytes {
            return Err(Error::Other(format!(
                "key of {} bytes is longer than the {} allowed",
                key.1.len(),
                self.limits.max_key_bytes
            )));
        }
        if let Some(v) = &value {
            if v.len() > self.limits.max_value_bytes {
                return Err(Error::Other(format!(
                    "value of key {:?} is {} bytes, more than the {} allowed",
                    key.1,
                    v.len(),
                    self.limits.max_value_bytes
                )));
            }
            let is_new = self.read(&key).is_none();
            if is_new && self.key_count() >= self.limits.max_keys {
                return Err(Error::Other(format!(
                    "workload {:?} already holds {} keys, the most allowed",
                    &*self.workload, self.limits.max_keys
                )));
            }
        }
        self.pending.kv.insert(key, value);
        Ok(())
    }

    fn key_count(&self) -> usize {
        let committed = lock(&self.committed);
        let mut count = committed.len();
        for (key, value) in &self.pending.kv {
            match (committed.contains_key(key), value.is_some()) {
                (false, true) => count += 1,
                (true, false) => count -= 1,
                _ => {}
            }
        }
        count
    }

    fn keys_of(&self, bucket: &str) -> Vec<String> {
        let committed = lock(&self.committed);
        let mut keys: BTreeSet<String> = committed
            .keys()
            .filter(|(b, _)| b == bucket)
            .map(|(_, k)| k.clone())
            .collect();
        for ((b, k), value) in &self.pending.kv {
            if b == bucket {
                if value.is_some() {
                    keys.insert(k.clone());
                } else {
                    keys.remove(k);
                }
            }
        }
        keys.into_iter().collect()
    }
}

impl Host for DeviceState {
    fn open(&mut self, identifier: String) -> Result<Resource<Bucket>, Error> {
        let name = if identifier.is_empty() {
            DEFAULT_BUCKET.to_string()
        } else if identifier.len() > 64 {
            return Err(Error::Other(format!(
                "bucket name of {} bytes is longer than the 64 allowed",
                identifier.len()
            )));
        } else {
            identifier
        };
        self.table
            .push(Bucket { name })
            .map_err(|e| Error::Other(format!("cannot open bucket: {e}")))
    }
}

impl HostBucket for DeviceState {
    fn get(&mut self, bucket: Resource<Bucket>, key: String) -> Result<Option<Vec<u8>>, Error> {
        let name = self.bucket_name(&bucket)?;
        Ok(self.read(&(name, key)))
    }

    fn set(&mut self, bucket: Resource<Bucket>, key: String, value: Vec<u8>) -> Result<(), Error> {
        let name = self.bucket_name(&bucket)?;
        self.write((name, key), Some(value))
    }

    fn delete(&mut self, bucket: Resource<Bucket>, key: String) -> Result<(), Error> {
        let name = self.bucket_name(&bucket)?;
        self.write((name, key), None)
    }

    fn exists(&mut self, bucket: Resource<Bucket>, key: String) -> Result<bool, Error> {
        let name = self.bucket_name(&bucket)?;
        Ok(self.read(&(name, key)).is_some())
    }

    fn list_keys(
        &mut self,
        bucket: Resource<Bucket>,
        cursor: Option<u64>,
    ) -> Result<KeyResponse, Error> {
        let name = self.bucket_name(&bucket)?;
        let keys = self.keys_of(&name);
        let start = usize::try_from(cursor.unwrap_or(0)).unwrap_or(usize::MAX);
        let page: Vec<String> = keys.iter().skip(start).take(PAGE).cloned().collect();
        let next = start.saturating_add(page.len());
        let cursor = (next < keys.len()).then_some(next as u64);
        Ok(KeyResponse { keys: page, cursor })
    }

    fn drop(&mut self, bucket: Resource<Bucket>) -> wasmtime::Result<()> {
        self.table.delete(bucket)?;
        Ok(())
    }
}

impl crate::bindings::wasi::keyvalue::atomics::Host for DeviceState {
    fn increment(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        delta: u64,
    ) -> Result<u64, Error> {
        let name = self.bucket_name(&bucket)?;
        let full = (name, key);
        let current = match self.read(&full) {
            None => 0,
            Some(bytes) => std::str::from_utf8(&bytes)
                .ok()
                .and_then(|text| text.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    Error::Other(format!(
                        "key {:?} does not hold a decimal number, cannot increment it",
                        full.1
                    ))
                })?,
        };
        let next = current.checked_add(delta).ok_or_else(|| {
            Error::Other(format!("incrementing key {:?} would overflow u64", full.1))
        })?;
        self.write(full, Some(next.to_string().into_bytes()))?;
        Ok(next)
    }
}
