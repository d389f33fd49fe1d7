//! Workload kinds: the choice fields, fields that belong to one kind only, the isolation a kind
//! can run in, and the container and microVM specs.

use std::collections::BTreeMap;

use super::shape::{find, join};
use super::{Checker, Result};
use crate::spec::{
    ContainerWorkload, GuestRootRef, ImageRef, IsolationChoice, MicrovmWorkload, Tier,
};
use crate::tree::{Entry, Node, Value};

impl Checker<'_> {
    /// A string that must be one of `choices`.
    pub(super) fn choice<T: Copy>(
        &self,
        node: &Node,
        path: &str,
        noun: &str,
        choices: &[(&str, T)],
    ) -> Result<T> {
        let text = self.string(node, path, "a string")?;
        choices
            .iter()
            .find(|(name, _)| *name == text)
            .map(|(_, value)| *value)
            .ok_or_else(|| {
                let expected = choices
                    .iter()
                    .map(|(name, _)| format!("\"{name}\""))
                    .collect::<Vec<_>>()
                    .join(", ");
                self.error(
                    node.span.start,
                    path,
                    format!("unknown {noun} \"{text}\": expected one of {expected}"),
                )
            })
    }

    /// Refuses the first entry that `owners` gives to another kind than `kind`.
    pub(super) fn kind_only(
        &self,
        entries: &[Entry],
        prefix: &str,
        owners: &[(&str, Tier)],
        kind: Tier,
    ) -> Result<()> {
        for entry in entries {
            let Some((_, owner)) = owners.iter().find(|(key, _)| *key == entry.key) else {
                continue;
            };
            if *owner == kind {
                continue;
            }
            let this = match kind {
                Tier::Wasm => "a wasm module",
                Tier::Container => "a container (kind = \"container\")",
                Tier::Microvm => "a microVM (kind = \"microvm\")",
            };
            return Err(self.error(
                entry.key_span.start,
                &join(prefix, &entry.key),
                format!(
                    "`{}` applies to {} workloads only; this workload is {this}",
                    entry.key,
                    owner.as_str()
                ),
            ));
        }
        Ok(())
    }

    /// The kernel, root, vCPUs, command line, marker and boot timeout of a microVM workload.
    pub(super) fn microvm(
        &self,
        node: &Node,
        entries: &[Entry],
        prefix: &str,
    ) -> Result<MicrovmWorkload> {
        let path = |key: &str| format!("{prefix}.{key}");
        let kernel_node = &self
            .required(
                node,
                entries,
                prefix,
                "kernel",
                "a microVM needs a kernel: a path to a bzImage/vmlinuz (arm64: Image)",
            )?
            .value;
        let kernel = self.base_dir.join(self.non_empty_path(
            kernel_node,
            &path("kernel"),
            "the guest kernel",
        )?);
        let root =
            match (find(entries, "initramfs"), find(entries, "disk")) {
                (Some(initramfs), Some(disk)) => {
                    return Err(self.error(
                        disk.key_span.start,
                        &path("disk"),
                        format!(
                            "give `initramfs` or `disk`, not both (`initramfs` is on line {})",
                            self.line_of(initramfs.key_span.start)
                        ),
                    ));
                }
                (Some(entry), None) => GuestRootRef::Initramfs(self.base_dir.join(
                    self.non_empty_path(&entry.value, &path("initramfs"), "an initramfs")?,
                )),
                (None, Some(entry)) => GuestRootRef::Disk(self.base_dir.join(
                    self.non_empty_path(&entry.value, &path("disk"), "a root disk image")?,
                )),
                (None, None) => {
                    return Err(self.error(
                        node.span.start,
                        &path("initramfs"),
                        "missing field `initramfs`: a microVM boots from `initramfs` (a cpio \
                     archive) or `disk` (a raw root filesystem image)",
                    ));
                }
            };
        let vcpus = match find(entries, "vcpus") {
            None => 1,
            Some(entry) => {
                let Value::Integer(n) = entry.value.value else {
                    return Err(self.expected(&entry.value, &path("vcpus"), "a whole number"));
                };
                match u32::try_from(n) {
                    Ok(n) if (1..=MicrovmWorkload::MAX_VCPUS).contains(&n) => n,
                    _ => {
                        return Err(self.error(
                            entry.value.span.start,
                            &path("vcpus"),
                            format!(
                                "invalid vcpus {n}: expected 1 to {}",
                                MicrovmWorkload::MAX_VCPUS
                            ),
                        ));
                    }
                }
            }
        };
        let cmdline = match find(entries, "cmdline") {
            None => String::new(),
            Some(entry) => {
                let text = self.string(&entry.value, &path("cmdline"), "a string")?;
                if text.contains(['\n', '\0']) {
                    return Err(self.error(
                        entry.value.span.start,
                        &path("cmdline"),
                        "the kernel command line must be one line",
                    ));
                }
                text.to_owned()
            }
        };
        let ready_marker = match find(entries, "ready-marker") {
            None => None,
            Some(entry) => {
                let text = self.string(&entry.value, &path("ready-marker"), "a string")?;
                if text.trim().is_empty() || text.contains('\n') {
                    return Err(self.error(
                        entry.value.span.start,
                        &path("ready-marker"),
                        "the ready marker must be non-empty text on one line",
                    ));
                }
                Some(text.to_owned())
            }
        };
        let boot_timeout = find(entries, "boot-timeout")
            .map(|entry| {
                self.duration(
                    &entry.value,
                    &path("boot-timeout"),
                    "boot-timeout",
                    (
                        MicrovmWorkload::MIN_BOOT_TIMEOUT,
                        MicrovmWorkload::MAX_BOOT_TIMEOUT,
                    ),
                )
            })
            .transpose()?;
        Ok(MicrovmWorkload {
            kernel,
            root,
            vcpus,
            cmdline,
            ready_marker,
            boot_timeout,
        })
    }

    /// The image (or rootfs), command, args and env of a container workload.
    pub(super) fn container(
        &self,
        node: &Node,
        entries: &[Entry],
        prefix: &str,
    ) -> Result<ContainerWorkload> {
        let path = |key: &str| format!("{prefix}.{key}");
        let image = match (find(entries, "image"), find(entries, "rootfs")) {
            (Some(image), Some(rootfs)) => {
                return Err(self.error(
                    rootfs.key_span.start,
                    &path("rootfs"),
                    format!(
                        "give `image` or `rootfs`, not both (`image` is on line {})",
                        self.line_of(image.key_span.start)
                    ),
                ));
            }
            (Some(entry), None) => ImageRef::Oci(self.base_dir.join(self.non_empty_path(
                &entry.value,
                &path("image"),
                "an OCI image layout directory or tarball",
            )?)),
            (None, Some(entry)) => ImageRef::Rootfs(self.base_dir.join(self.non_empty_path(
                &entry.value,
                &path("rootfs"),
                "a root filesystem directory",
            )?)),
            (None, None) => {
                return Err(self.error(
                    node.span.start,
                    &path("image"),
                    "missing field `image`: a container needs `image` (an OCI image layout \
                     directory or tarball) or `rootfs` (a root filesystem directory)",
                ));
            }
        };
        let command = find(entries, "command")
            .map(|e| self.strings(&e.value, &path("command"), true))
            .transpose()?;
        let args = find(entries, "args")
            .map(|e| self.strings(&e.value, &path("args"), false))
            .transpose()?;
        if matches!(image, ImageRef::Rootfs(_)) && command.is_none() {
            return Err(self.error(
                node.span.start,
                &path("command"),
                "missing field `command`: a plain rootfs has no entrypoint, so say what to run, \
                 such as [\"/bin/sh\", \"-c\", \"echo hello\"]",
            ));
        }
        let mut env = BTreeMap::new();
        if let Some(entry) = find(entries, "env") {
            let env_path = path("env");
            let vars = self.table(&entry.value, &env_path, " of environment variables")?;
            self.deny_duplicates(vars, &env_path)?;
            for var in vars {
                let var_path = format!("{env_path}.{}", var.key);
                if var.key.is_empty() || var.key.contains(['=', '\0']) {
                    return Err(self.error(
                        var.key_span.start,
                        &var_path,
                        format!("invalid environment variable name {:?}", var.key),
                    ));
                }
                let value = self.string(&var.value, &var_path, "a string")?;
                env.insert(var.key.clone(), value.to_owned());
            }
        }
        Ok(ContainerWorkload {
            image,
            command,
            args,
            env,
        })
    }

    pub(super) fn non_empty_path<'n>(
        &self,
        node: &'n Node,
        path: &str,
        what: &str,
    ) -> Result<&'n str> {
        let text = self.string(node, path, "a string")?;
        if text.trim().is_empty() {
            return Err(self.error(
                node.span.start,
                path,
                format!("the path is empty: expected {what} (relative to the deployment file)"),
            ));
        }
        Ok(text)
    }

    /// A list of strings; `non_empty` requires at least one, with a non-empty first.
    pub(super) fn strings(&self, node: &Node, path: &str, non_empty: bool) -> Result<Vec<String>> {
        let items = self.array(node, path, "a list of strings")?;
        let mut out = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            out.push(
                self.string(item, &format!("{path}[{index}]"), "a string")?
                    .to_owned(),
            );
        }
        if non_empty && out.first().is_none_or(|first| first.is_empty()) {
            return Err(self.error(
                node.span.start,
                path,
                "the command is empty: expected the program and its arguments, such as \
                 [\"/bin/sh\", \"-c\", \"echo hello\"]",
            ));
        }
        Ok(out)
    }
}

/// Why a kind cannot run in the asked isolation tier, if it cannot. A Wasm module runs in the
/// agent's engine only; a container image runs in a container (a microVM that boots an OCI
/// rootfs is not built). `strongest` fits every kind.
pub(super) fn isolation_mismatch(kind: Tier, choice: IsolationChoice) -> Option<String> {
    let fits = match choice {
        IsolationChoice::Strongest => true,
        IsolationChoice::Tier(tier) => tier == kind,
    };
    (!fits).then(|| {
        let (what, only) = match kind {
            Tier::Wasm => ("a wasm module", "wasm"),
            Tier::Container => ("a container image", "container"),
            Tier::Microvm => ("a microVM kernel", "microvm"),
        };
        format!(
            "{what} cannot run in \"{}\" isolation: it runs in \"{only}\" isolation (or say \"strongest\")",
            choice.as_str()
        )
    })
}
