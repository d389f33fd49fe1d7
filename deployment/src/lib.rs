//! Deployment files: schema, parsing with located errors, static validation.
//!
//! A deployment file lists the workloads a node should run. It is TOML, or JSON with the same
//! schema when its name ends in `.json`; field names are kebab-case:
//!
//! ```toml
//! description = "demo on the simulated board"   # optional
//!
//! [[workloads]]
//! name = "counter"               # [a-z0-9][a-z0-9-]{0,62}, unique in the file
//! module = "counter.wasm"        # path relative to the file, or "sha256:<64 hex digits>"
//! restart = "on-failure"         # always | on-failure (default) | never
//! triggers = [{ interval = "500ms" }]
//! [workloads.config]             # strings; numbers and booleans are kept as their text
//! step = 1
//! [workloads.limits]
//! memory = "16MiB"               # B, KiB, MiB, GiB (1024-based), 64KiB to 1TiB
//! time-slice = "100ms"           # 1ms to 1h
//! queue = 64                     # 1 to 4096
//! ```
//!
//! Device grants (each list optional; empty or absent means the workload may use no device):
//!
//! ```toml
//! [[workloads]]
//! name = "blinky"
//! module = "blinky.wasm"
//! gpio = [
//!   { name = "led", pin = "GPIO17", mode = "output", initial = "low" },   # initial: low | high
//!   { name = "button", pin = "GPIO27", mode = "input", bias = "pull-up",  # disabled | pull-up | pull-down
//!     edge = "falling", debounce = "5ms" },                               # rising | falling | both
//! ]
//! spi = [{ name = "adc", bus = "spi0.0", max-hz = 1000000 }]   # max-hz defaults to 1 MHz
//! i2c = [{ name = "env", bus = "i2c-1", addresses = [0x48] }]  # 7-bit addresses
//! ```
//!
//! Container workloads (`kind = "container"`) run an OCI image or a plain root filesystem
//! through crun or runc, read-only, without network, under cgroup limits:
//!
//! ```toml
//! [[workloads]]
//! name = "hello"
//! kind = "container"             # wasm (default) | container | microvm
//! image = "hello-oci"            # OCI layout directory or tarball (.tar, .tar.gz, .tgz),
//! # rootfs = "rootfs"            #   or a plain root filesystem directory (one of the two)
//! command = ["/bin/sh", "-c"]    # replaces the image's entrypoint
//! args = ["echo hello"]          # replaces the image's default arguments
//! env = { MODE = "test" }        # added to the image's environment
//! isolation = "container"        # wasm | container | microvm | strongest (default: the kind's)
//! restart = "on-failure"         # restarts with back-off 100ms doubling to 30s
//! gpio = [{ name = "led", pin = "GPIO17", mode = "output" }]  # the pin's /dev/gpiochipN
//! [workloads.limits]
//! memory = "32MiB"
//! cpus = 0.5                     # CPU quota in cores, at least 0.01
//! pids = 64
//! ```
//!
//! MicroVM workloads (`kind = "microvm"`) boot a kernel under QEMU (KVM when a trial boot
//! proves it works, TCG otherwise); the serial console is their log:
//!
//! ```toml
//! [[workloads]]
//! name = "vm"
//! kind = "microvm"
//! kernel = "vmlinuz"             # the guest kernel
//! initramfs = "initrd.cpio.gz"   # or disk = "root.img" (attached read-only as the root)
//! vcpus = 1                      # 1 to 64 (default 1)
//! cmdline = "quiet"              # appended to Lichen's console settings (at most 1KiB)
//! ready-marker = "LICHEN-READY"  # console text that means ready (the default; at most 256 bytes)
//! boot-timeout = "60s"           # a boot that does not print it in time is failed (1ms to 1h)
//! [workloads.limits]
//! memory = "128MiB"              # guest memory, at least 32MiB (default 128MiB)
//! ```
//!
//! `triggers`, `config`, `time-slice` and `queue` apply to Wasm workloads only; `command`,
//! `args`, `env`, `cpus` and `pids` to containers only; `kernel`, `initramfs`, `disk`, `vcpus`,
//! `cmdline`, `ready-marker` and `boot-timeout` to microVMs only.
//!
//! Logical names follow the workload-name pattern and are unique within a workload. Pins and
//! buses are checked against the agent's board profile at deploy (`crate::grants`).
//!
//! The rules, where the issue left a choice:
//! - `workloads` is required; `workloads = []` is a valid deployment that runs nothing (so an
//!   empty or truncated file is an error rather than an order to stop everything).
//! - Durations use `humantime` syntax: `"500ms"`, `"500 ms"`, `"1m 30s"`, `"1.5s"`.
//! - Every size, count, duration and length has a bound, a constant next to its field in the
//!   typed model ([`Limits::MAX_QUEUE`], [`Trigger::MAX_INTERVAL`]...); a value past it is
//!   refused naming the field and the bound. Intervals 1ms to 1y; time slices 1ms to 1h;
//!   debounce 1ms to 10s; boot timeouts 1ms to 1h; memory 64KiB (microVMs 32MiB) to 1TiB;
//!   queue 1 to 4096; cpus 0.01 to 1024; pids 1 to 4194304; vcpus 1 to 64; max-hz 1 to 1 GHz;
//!   at most 4096 workloads, 128 triggers, 64 grants per list, 256 config entries (keys 256
//!   bytes, values 64KiB), 1024 `command`/`args` items of 128KiB, 256 `env` variables (names
//!   256 bytes, values 128KiB); paths 4096 bytes; `cmdline` 1KiB; `ready-marker` 256 bytes;
//!   `description` 4KiB; the whole text 4MiB.
//! - Sizes are a whole number and an optional binary unit (`B`, `KiB`, `MiB`, `GiB`, any case);
//!   an integer means bytes. `KB`/`MB`/`GB` are refused as ambiguous instead of guessed.
//! - Module digests may be written in either case and are stored lowercase.
//!
//! [`parse`] checks everything that can be checked without loading the modules; it reports the
//! first problem in file order with its line, column and field path. Errors found later (when a
//! module is loaded or compiled) are located with [`ParsedDeployment::error_at`].
//!
//! ```
//! use std::path::Path;
//! use lichen_deployment::{self as deployment, ModuleRef};
//!
//! let text = "[[workloads]]\nname = \"counter\"\nmodule = \"counter.wasm\"\n";
//! let parsed = deployment::parse("deploy.toml", text, Path::new("/srv")).unwrap();
//! assert_eq!(parsed.spec.workloads[0].module(), Some(&ModuleRef::Path("/srv/counter.wasm".into())));
//!
//! let error = deployment::parse("deploy.toml", "[[workloads]]\nname = \"Bad\"\n", Path::new("."))
//!     .unwrap_err();
//! assert_eq!(error.line, Some(2));
//! assert!(error.to_string().starts_with("deploy.toml:2:8: workloads[0].name: invalid workload name"));
//! ```

mod bounds;
mod duration;
mod json;
mod locate;
mod size;
mod spec;
mod state;
mod text;
mod tree;
mod validate;

use std::path::Path;

pub use bounds::{BoundError, show_bytes, show_duration};
pub use duration::{DurationError, parse_duration_within};
pub use size::{SizeError, parse_size};
pub use spec::{
    Artifact, ContainerWorkload, DeploymentSpec, GpioEdgeTrigger, GpioGrantSpec, GpioMode,
    GuestRootRef, I2cGrantSpec, ImageRef, IsolationChoice, Limits, MicrovmWorkload, ModuleRef,
    RestartPolicy, SpiGrantSpec, Tier, Trigger, WasmArtifact, WorkloadSpec,
};
pub use state::WorkloadState;
pub use text::escape_unprintable;

use locate::{LineIndex, SourceMap};
use tree::Format;
use validate::Checker;

/// A problem in a deployment file, located as precisely as known.
///
/// Displays as `deploy.toml:12:5: workloads[1].module: <message>`, leaving out the parts that are
/// `None`.
///
/// Whatever the file put in the field path or the message (a name with a newline or a
/// right-to-left override) is escaped when it is displayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{}{}",
    crate::escape_unprintable(&self.prefix()),
    crate::escape_unprintable(&self.message)
)]
pub struct DeploymentError {
    /// The file name, as given to [`parse`].
    pub file: String,
    /// 1-based line of the problem.
    pub line: Option<usize>,
    /// 1-based column (in characters) of the problem.
    pub column: Option<usize>,
    /// Path of the field at fault, such as `workloads[1].limits.memory`.
    pub field: Option<String>,
    /// What was wrong and what was expected, lowercase.
    pub message: String,
}

impl DeploymentError {
    fn prefix(&self) -> String {
        let mut prefix = self.file.clone();
        if let Some(line) = self.line {
            prefix.push_str(&format!(":{line}"));
            if let Some(column) = self.column {
                prefix.push_str(&format!(":{column}"));
            }
        }
        prefix.push_str(": ");
        if let Some(field) = &self.field {
            prefix.push_str(field);
            prefix.push_str(": ");
        }
        prefix
    }
}

/// A validated deployment with the locations of its workloads' fields, for later errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedDeployment {
    /// The validated deployment.
    pub spec: DeploymentSpec,
    file_name: String,
    source_map: SourceMap,
}

impl ParsedDeployment {
    /// Builds an error located at `workloads[index].field` (line/column of that field, or of the
    /// workload's table when the field is absent).
    ///
    /// `field` is a path relative to the workload: `module`, `limits.memory`, `triggers[0]`; an
    /// empty `field` means the workload itself. A missing field falls back to its nearest present
    /// parent. With an index past the last workload, the error has no line.
    pub fn error_at(
        &self,
        workload_index: usize,
        field: &str,
        message: impl Into<String>,
    ) -> DeploymentError {
        let location = self.source_map.locate(workload_index, field);
        let path = if field.is_empty() {
            format!("workloads[{workload_index}]")
        } else {
            format!("workloads[{workload_index}].{field}")
        };
        DeploymentError {
            file: self.file_name.clone(),
            line: location.map(|location| location.line),
            column: location.map(|location| location.column),
            field: Some(path),
            message: message.into(),
        }
    }

    /// A deployment of already validated workloads that no file located (the agent's API:
    /// one workload of the `pods` or `devices` source); its errors name fields without a line.
    pub fn from_spec(file_name: &str, spec: DeploymentSpec) -> Self {
        Self {
            spec,
            file_name: file_name.to_owned(),
            source_map: SourceMap::default(),
        }
    }

    /// The file name given to [`parse`].
    pub fn file_name(&self) -> &str {
        &self.file_name
    }
}

/// Parses and statically validates a deployment file.
///
/// `file_name` picks the format (JSON when it ends in `.json`, TOML otherwise) and names the file
/// in errors; relative module paths are joined with `base_dir`.
pub fn parse(
    file_name: &str,
    text: &str,
    base_dir: &Path,
) -> Result<ParsedDeployment, DeploymentError> {
    if text.len() > DeploymentSpec::MAX_TEXT_BYTES {
        return Err(DeploymentError {
            file: file_name.to_owned(),
            line: None,
            column: None,
            field: None,
            message: format!(
                "the deployment is {} bytes long; the largest accepted is {} ({} bytes)",
                text.len(),
                bounds::show_bytes(
                    DeploymentSpec::MAX_TEXT_BYTES
                        .try_into()
                        .unwrap_or(u64::MAX)
                ),
                DeploymentSpec::MAX_TEXT_BYTES
            ),
        });
    }
    let format = if Path::new(file_name)
        .extension()
        .is_some_and(|extension| extension.eq_ignore_ascii_case("json"))
    {
        Format::Json
    } else {
        Format::Toml
    };
    let lines = LineIndex::new(text);
    let syntax_error = |offset: usize, message: String| {
        let location = lines.locate(offset);
        DeploymentError {
            file: file_name.to_owned(),
            line: Some(location.line),
            column: Some(location.column),
            field: None,
            message,
        }
    };

    let document = match format {
        Format::Toml => match toml::de::DeTable::parse(text) {
            Ok(table) => tree::from_toml(table),
            Err(error) => {
                let span = error.span().unwrap_or(0..0);
                let mut message = format!("invalid TOML: {}", error.message().trim_end());
                if message.ends_with("duplicate key")
                    && let Some(key) = text.get(span.clone()).filter(|key| !key.is_empty())
                {
                    message.push_str(&format!(" `{key}`"));
                }
                return Err(syntax_error(span.start, message));
            }
        },
        Format::Json => {
            if let Err(error) = serde_json::from_str::<serde_json::Value>(text) {
                return Err(json_syntax_error(file_name, &error));
            }
            json::read(text).map_err(|error| {
                syntax_error(error.offset, format!("invalid JSON: {}", error.message))
            })?
        }
    };

    let checker = Checker {
        file: file_name,
        lines: &lines,
        format,
        base_dir,
    };
    let (spec, source_map) = checker.deployment(&document)?;
    let parsed = ParsedDeployment {
        spec,
        file_name: file_name.to_owned(),
        source_map,
    };
    // The checker refuses each value out of bounds where it reads it; this makes sure of it
    // for every bound, so nothing out of bounds is ever accepted.
    match parsed.spec.check_bounds() {
        Ok(()) => Ok(parsed),
        Err((Some(index), error)) => Err(parsed.error_at(index, &error.field, error.message)),
        Err((None, error)) => Err(DeploymentError {
            file: file_name.to_owned(),
            line: None,
            column: None,
            field: Some(error.field),
            message: error.message,
        }),
    }
}

/// A `serde_json` syntax error, without the " at line L column C" that we report separately.
fn json_syntax_error(file_name: &str, error: &serde_json::Error) -> DeploymentError {
    let text = error.to_string();
    let suffix = format!(" at line {} column {}", error.line(), error.column());
    let message = text.strip_suffix(&suffix).unwrap_or(&text);
    DeploymentError {
        file: file_name.to_owned(),
        line: (error.line() > 0).then_some(error.line()),
        column: (error.line() > 0 && error.column() > 0).then_some(error.column()),
        field: None,
        message: format!("invalid JSON: {message}"),
    }
}

#[cfg(test)]
mod tests;
