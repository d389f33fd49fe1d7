//! `wasi:config/store`: the workload's `config` table from its deployment.

use crate::DeviceState;
use crate::bindings::wasi::config::store::{Error, Host};

impl Host for DeviceState {
    fn get(&mut self, key: String) -> Result<Option<String>, Error> {
        Ok(self.config.get(&key).cloned())
    }

    fn get_all(&mut self) -> Result<Vec<(String, String)>, Error> {
        Ok(self
            .config
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}
