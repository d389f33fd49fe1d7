//! The bounds of a typed deployment, checked again on the typed value.
//!
//! Every size, count, duration and length of a deployment has a documented bound, kept as a
//! constant next to its field in [`spec`](super::spec) (`Limits::MAX_QUEUE`,
//! `Trigger::MAX_INTERVAL`...). The file checker refuses a value out of bounds where it reads
//! it, quoting the text; [`WorkloadSpec::check_bounds`] checks the same constants on a typed
//! spec. [`parse`](super::parse) runs it on everything it accepts, so no spec outside the
//! bounds leaves it, and the agent runs it on each stored workload before starting it, so a
//! deployment stored by an older agent with looser rules fails that workload instead of the
//! agent.

use std::time::Duration;

use super::spec::{
    Artifact, ContainerWorkload, DeploymentSpec, GpioGrantSpec, GuestRootRef, ImageRef, Limits,
    MicrovmWorkload, ModuleRef, SpiGrantSpec, Tier, Trigger, WorkloadSpec,
};

/// A value outside its bound: the field (relative to the workload, such as `limits.queue` or
/// `triggers[0].interval`; top-level fields are named alone) and what the bound is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct BoundError {
    /// The field at fault.
    pub field: String,
    /// The value and the bound, lowercase.
    pub message: String,
}

impl BoundError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        BoundError {
            field: field.into(),
            message: message.into(),
        }
    }
}

type Checked = Result<(), BoundError>;

impl DeploymentSpec {
    /// Checks the deployment's own bounds and each workload's; on failure, the index of the
    /// workload at fault (`None` for a top-level field) and the error.
    pub fn check_bounds(&self) -> Result<(), (Option<usize>, BoundError)> {
        at_most_items(
            "workloads",
            self.workloads.len(),
            DeploymentSpec::MAX_WORKLOADS,
            "workloads",
        )
        .map_err(|e| (None, e))?;
        if let Some(description) = &self.description {
            at_most_bytes(
                "description",
                description,
                DeploymentSpec::MAX_DESCRIPTION_BYTES,
            )
            .map_err(|e| (None, e))?;
        }
        for (index, workload) in self.workloads.iter().enumerate() {
            workload.check_bounds().map_err(|e| (Some(index), e))?;
        }
        Ok(())
    }
}

impl WorkloadSpec {
    /// Checks every bounded field of this workload; the first one out of bounds is named.
    pub fn check_bounds(&self) -> Checked {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= WorkloadSpec::MAX_NAME_LEN
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !self.name.starts_with('-');
        if !name_ok {
            return Err(BoundError::new(
                "name",
                format!(
                    "invalid workload name {:?}: use 1 to {} characters from a-z, 0-9 and '-', \
                     starting with a letter or a digit",
                    self.name,
                    WorkloadSpec::MAX_NAME_LEN
                ),
            ));
        }
        match &self.artifact {
            Artifact::Wasm(wasm) => {
                if let ModuleRef::Path(path) = &wasm.module {
                    path_bytes("module", path)?;
                }
                args_bounds("args", &wasm.args)?;
                env_bounds(&wasm.env)?;
            }
            Artifact::Container(container) => container.check_bounds()?,
            Artifact::Microvm(vm) => vm.check_bounds()?,
        }
        at_most_items(
            "config",
            self.config.len(),
            WorkloadSpec::MAX_CONFIG_ENTRIES,
            "entries",
        )?;
        for (key, value) in &self.config {
            let field = format!("config.{key}");
            at_most_bytes(&field, key, WorkloadSpec::MAX_CONFIG_KEY_BYTES).map_err(|_| {
                BoundError::new(
                    "config",
                    format!(
                        "config key is {} bytes long; at most {} bytes are accepted",
                        key.len(),
                        WorkloadSpec::MAX_CONFIG_KEY_BYTES
                    ),
                )
            })?;
            at_most_bytes(&field, value, WorkloadSpec::MAX_CONFIG_VALUE_BYTES)?;
        }
        at_most_items(
            "triggers",
            self.triggers.len(),
            WorkloadSpec::MAX_TRIGGERS,
            "triggers",
        )?;
        for (index, trigger) in self.triggers.iter().enumerate() {
            match trigger {
                Trigger::Interval(period) => within(
                    &format!("triggers[{index}].interval"),
                    "interval",
                    *period,
                    Trigger::MIN_INTERVAL,
                    Trigger::MAX_INTERVAL,
                )?,
                Trigger::GpioEdge(edge) => {
                    if let Some(debounce) = edge.debounce {
                        within(
                            &format!("triggers[{index}].debounce"),
                            "debounce",
                            debounce,
                            GpioGrantSpec::MIN_DEBOUNCE,
                            GpioGrantSpec::MAX_DEBOUNCE,
                        )?;
                    }
                }
            }
        }
        self.limits.check_bounds(self.kind())?;
        at_most_items("gpio", self.gpio.len(), WorkloadSpec::MAX_GRANTS, "grants")?;
        for (index, grant) in self.gpio.iter().enumerate() {
            resource_name(&format!("gpio[{index}].pin"), &grant.pin)?;
            if let Some(debounce) = grant.debounce {
                within(
                    &format!("gpio[{index}].debounce"),
                    "debounce",
                    debounce,
                    GpioGrantSpec::MIN_DEBOUNCE,
                    GpioGrantSpec::MAX_DEBOUNCE,
                )?;
            }
        }
        at_most_items("spi", self.spi.len(), WorkloadSpec::MAX_GRANTS, "grants")?;
        for (index, grant) in self.spi.iter().enumerate() {
            resource_name(&format!("spi[{index}].bus"), &grant.bus)?;
            if !(1..=SpiGrantSpec::MAX_HZ).contains(&grant.max_hz) {
                return Err(BoundError::new(
                    format!("spi[{index}].max-hz"),
                    format!(
                        "invalid SPI clock {} Hz: expected 1 to {} Hz",
                        grant.max_hz,
                        SpiGrantSpec::MAX_HZ
                    ),
                ));
            }
        }
        at_most_items("i2c", self.i2c.len(), WorkloadSpec::MAX_GRANTS, "grants")?;
        for (index, grant) in self.i2c.iter().enumerate() {
            resource_name(&format!("i2c[{index}].bus"), &grant.bus)?;
            if let Some(address) = grant.addresses.iter().find(|a| **a > 0x7f) {
                return Err(BoundError::new(
                    format!("i2c[{index}].addresses"),
                    format!("I2C address {address:#x} is not a 7-bit address (0x00 to 0x7f)"),
                ));
            }
            at_most_items(
                &format!("i2c[{index}].addresses"),
                grant.addresses.len(),
                128,
                "addresses",
            )?;
        }
        Ok(())
    }
}

impl Limits {
    /// Checks the limits of a workload of `kind`.
    fn check_bounds(&self, kind: Tier) -> Checked {
        if let Some(memory) = self.memory_bytes {
            let min = match kind {
                Tier::Microvm => MicrovmWorkload::MIN_MEMORY_BYTES,
                Tier::Wasm | Tier::Container => Limits::MIN_MEMORY_BYTES,
            };
            if !(min..=Limits::MAX_MEMORY_BYTES).contains(&memory) {
                return Err(BoundError::new(
                    "limits.memory",
                    format!(
                        "memory limit of {memory} bytes is out of bounds: expected {} to {}",
                        show_bytes(min),
                        show_bytes(Limits::MAX_MEMORY_BYTES)
                    ),
                ));
            }
        }
        if let Some(slice) = self.time_slice {
            within(
                "limits.time-slice",
                "time-slice",
                slice,
                Limits::MIN_TIME_SLICE,
                Limits::MAX_TIME_SLICE,
            )?;
        }
        if let Some(queue) = self.queue
            && !(1..=Limits::MAX_QUEUE).contains(&queue)
        {
            return Err(BoundError::new(
                "limits.queue",
                format!(
                    "invalid queue length {queue}: expected 1 to {} events",
                    Limits::MAX_QUEUE
                ),
            ));
        }
        if let Some(millis) = self.cpu_millis
            && !(Limits::MIN_CPU_MILLIS..=Limits::MAX_CPU_MILLIS).contains(&millis)
        {
            return Err(BoundError::new(
                "limits.cpus",
                format!(
                    "invalid CPU quota {}: expected {} to {} cores",
                    f64::from(millis) / 1000.0,
                    f64::from(Limits::MIN_CPU_MILLIS) / 1000.0,
                    Limits::MAX_CPU_MILLIS / 1000
                ),
            ));
        }
        if let Some(pids) = self.pids
            && !(1..=Limits::MAX_PIDS).contains(&pids)
        {
            return Err(BoundError::new(
                "limits.pids",
                format!(
                    "invalid pids limit {pids}: expected 1 to {}",
                    Limits::MAX_PIDS
                ),
            ));
        }
        Ok(())
    }
}

impl ContainerWorkload {
    fn check_bounds(&self) -> Checked {
        match &self.image {
            ImageRef::Oci(path) => path_bytes("image", path)?,
            ImageRef::Rootfs(path) => path_bytes("rootfs", path)?,
        }
        for (field, list) in [("command", &self.command), ("args", &self.args)] {
            let Some(list) = list else { continue };
            args_bounds(field, list)?;
        }
        env_bounds(&self.env)?;
        Ok(())
    }
}

/// A list of program arguments: at most [`ContainerWorkload::MAX_ARGS`] items of
/// [`ContainerWorkload::MAX_ARG_BYTES`].
fn args_bounds(field: &str, list: &[String]) -> Checked {
    at_most_items(field, list.len(), ContainerWorkload::MAX_ARGS, "items")?;
    for (index, item) in list.iter().enumerate() {
        at_most_bytes(
            &format!("{field}[{index}]"),
            item,
            ContainerWorkload::MAX_ARG_BYTES,
        )?;
    }
    Ok(())
}

/// Environment variables: at most [`ContainerWorkload::MAX_ENV`], names without `=` or NUL.
fn env_bounds(env: &std::collections::BTreeMap<String, String>) -> Checked {
    at_most_items("env", env.len(), ContainerWorkload::MAX_ENV, "variables")?;
    for (name, value) in env {
        let field = format!("env.{name}");
        if name.is_empty() || name.contains(['=', '\0']) {
            return Err(BoundError::new(
                field,
                format!("invalid environment variable name {name:?}"),
            ));
        }
        if name.len() > ContainerWorkload::MAX_ENV_NAME_BYTES {
            return Err(BoundError::new(
                "env",
                format!(
                    "environment variable name is {} bytes long; at most {} bytes are accepted",
                    name.len(),
                    ContainerWorkload::MAX_ENV_NAME_BYTES
                ),
            ));
        }
        at_most_bytes(&field, value, ContainerWorkload::MAX_ARG_BYTES)?;
    }
    Ok(())
}

impl MicrovmWorkload {
    fn check_bounds(&self) -> Checked {
        path_bytes("kernel", &self.kernel)?;
        match &self.root {
            GuestRootRef::Initramfs(path) => path_bytes("initramfs", path)?,
            GuestRootRef::Disk(path) => path_bytes("disk", path)?,
        }
        if !(1..=MicrovmWorkload::MAX_VCPUS).contains(&self.vcpus) {
            return Err(BoundError::new(
                "vcpus",
                format!(
                    "invalid vcpus {}: expected 1 to {}",
                    self.vcpus,
                    MicrovmWorkload::MAX_VCPUS
                ),
            ));
        }
        at_most_bytes("cmdline", &self.cmdline, MicrovmWorkload::MAX_CMDLINE_BYTES)?;
        if self.cmdline.contains(['\n', '\0']) {
            return Err(BoundError::new(
                "cmdline",
                "the kernel command line must be one line",
            ));
        }
        if let Some(marker) = &self.ready_marker {
            at_most_bytes(
                "ready-marker",
                marker,
                MicrovmWorkload::MAX_READY_MARKER_BYTES,
            )?;
        }
        if let Some(timeout) = self.boot_timeout {
            within(
                "boot-timeout",
                "boot-timeout",
                timeout,
                MicrovmWorkload::MIN_BOOT_TIMEOUT,
                MicrovmWorkload::MAX_BOOT_TIMEOUT,
            )?;
        }
        Ok(())
    }
}

/// A duration, as the files write it (`1year`, `1h`, `500ms`).
pub fn show_duration(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

/// A byte count in the largest binary unit that divides it (`4MiB`, `1TiB`, `1000 bytes`).
pub fn show_bytes(bytes: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes} bytes")
}

/// `duration` is within `min..=max`.
fn within(field: &str, what: &str, duration: Duration, min: Duration, max: Duration) -> Checked {
    if duration < min {
        return Err(BoundError::new(
            field,
            format!(
                "{what} {} is too short: it must be at least {}",
                show_duration(duration),
                show_duration(min)
            ),
        ));
    }
    if duration > max {
        return Err(BoundError::new(
            field,
            format!(
                "{what} {} is too long: it must be at most {}",
                show_duration(duration),
                show_duration(max)
            ),
        ));
    }
    Ok(())
}

fn at_most_items(field: &str, count: usize, max: usize, noun: &str) -> Checked {
    if count > max {
        return Err(BoundError::new(
            field,
            format!("{count} {noun} are too many: at most {max} are accepted"),
        ));
    }
    Ok(())
}

fn at_most_bytes(field: &str, text: &str, max: usize) -> Checked {
    if text.len() > max {
        return Err(BoundError::new(
            field,
            format!(
                "the value is {} bytes long; at most {} are accepted",
                text.len(),
                show_bytes(u64::try_from(max).unwrap_or(u64::MAX))
            ),
        ));
    }
    Ok(())
}

fn path_bytes(field: &str, path: &std::path::Path) -> Checked {
    let length = path.as_os_str().len();
    if length > WorkloadSpec::MAX_PATH_BYTES {
        return Err(BoundError::new(
            field,
            format!(
                "the path is {length} bytes long; at most {} bytes are accepted (PATH_MAX)",
                WorkloadSpec::MAX_PATH_BYTES
            ),
        ));
    }
    Ok(())
}

fn resource_name(field: &str, name: &str) -> Checked {
    if name.len() > WorkloadSpec::MAX_RESOURCE_NAME_BYTES {
        return Err(BoundError::new(
            field,
            format!(
                "board resource name is {} bytes long; at most {} bytes are accepted",
                name.len(),
                WorkloadSpec::MAX_RESOURCE_NAME_BYTES
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
#[path = "bounds_tests.rs"]
mod tests;
