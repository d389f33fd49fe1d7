//! What GPIO, SPI and I2C hardware the host really has, for `lichen doctor`.

use std::fmt;
use std::path::{Path, PathBuf};

/// One line of a gpiochip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineInfo {
    /// Offset on the chip.
    pub offset: u32,
    /// The line's label (may be empty).
    pub name: String,
    /// Who holds it, if anyone.
    pub consumer: Option<String>,
}

/// One gpiochip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChipInfo {
    /// Device node (`/dev/gpiochip0`).
    pub path: PathBuf,
    /// Kernel name (`gpiochip0`).
    pub name: String,
    /// Chip label (`pinctrl-bcm2711`).
    pub label: String,
    /// How many lines the chip has.
    pub line_count: u32,
    /// Its lines.
    pub lines: Vec<LineInfo>,
}

/// The devices found on the host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    /// The device-tree model, when the host has a device tree.
    pub model: Option<String>,
    /// The gpiochips.
    pub gpiochips: Vec<ChipInfo>,
    /// spidev nodes (`/dev/spidev0.0`).
    pub spidev: Vec<PathBuf>,
    /// i2c-dev nodes (`/dev/i2c-1`).
    pub i2c: Vec<PathBuf>,
    /// Things that could not be read (a chip without permission), one sentence each.
    pub problems: Vec<String>,
}

/// List the gpiochips (name, label, line count, line names), spidev and i2c-dev nodes of this
/// host. Never fails: what cannot be read is listed in [`Inventory::problems`].
pub fn inventory() -> Inventory {
    let mut inv = Inventory {
        model: std::fs::read(crate::board::DEVICE_TREE_MODEL)
            .ok()
            .map(|raw| {
                String::from_utf8_lossy(&raw)
                    .trim_end_matches('\0')
                    .trim()
                    .to_owned()
            }),
        ..Inventory::default()
    };
    gpiochips(&mut inv);
    inv.spidev = dev_nodes(Path::new("/dev"), "spidev", &mut inv.problems);
    inv.i2c = dev_nodes(Path::new("/dev"), "i2c-", &mut inv.problems);
    inv
}

#[cfg(target_os = "linux")]
fn gpiochips(inv: &mut Inventory) {
    let paths = match crate::linux::chip_paths() {
        Ok(p) => p,
        Err(e) => {
            inv.problems.push(format!("cannot list gpiochips: {e}"));
            return;
        }
    };
    for path in paths {
        let chip = match gpiocdev::Chip::from_path(&path) {
            Ok(c) => c,
            Err(e) => {
                inv.problems.push(format!("{}: {e}", path.display()));
                continue;
            }
        };
        let info = match chip.info() {
            Ok(i) => i,
            Err(e) => {
                inv.problems.push(format!("{}: {e}", path.display()));
                continue;
            }
        };
        let lines = (0..info.num_lines)
            .filter_map(|offset| chip.line_info(offset).ok())
            .map(|l| LineInfo {
                offset: l.offset,
                name: l.name,
                consumer: (l.used || !l.consumer.is_empty()).then_some(l.consumer),
            })
            .collect();
        inv.gpiochips.push(ChipInfo {
            path,
            name: info.name,
            label: info.label,
            line_count: info.num_lines,
            lines,
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn gpiochips(inv: &mut Inventory) {
    inv.problems
        .push("gpiochips are only listed on Linux".to_owned());
}

fn dev_nodes(dir: &Path, prefix: &str, problems: &mut Vec<String>) -> Vec<PathBuf> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            problems.push(format!("cannot list {}: {e}", dir.display()));
            return Vec::new();
        }
    };
    let mut nodes: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect();
    // Natural order: i2c-2 before i2c-10.
    nodes.sort_by_key(|p| {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
        let name = name.unwrap_or_default();
        let digits: String = name.chars().filter(char::is_ascii_digit).collect();
        (name.len(), digits, name)
    });
    nodes
}

impl fmt::Display for Inventory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.model {
            Some(m) => writeln!(f, "device-tree model: {m}")?,
            None => writeln!(f, "device-tree model: none (no /proc/device-tree)")?,
        }
        if self.gpiochips.is_empty() {
            writeln!(f, "gpiochips: none found")?;
        } else {
            writeln!(f, "gpiochips: {}", self.gpiochips.len())?;
        }
        for chip in &self.gpiochips {
            writeln!(
                f,
                "  {} [{}] {} lines ({})",
                chip.name,
                chip.label,
                chip.line_count,
                chip.path.display()
            )?;
            for line in &chip.lines {
                let name = if line.name.is_empty() {
                    "unnamed"
                } else {
                    line.name.as_str()
                };
                match &line.consumer {
                    Some(c) => writeln!(f, "    line {:3}: {name} (used by \"{c}\")", line.offset)?,
                    None => writeln!(f, "    line {:3}: {name}", line.offset)?,
                }
            }
        }
        let list = |nodes: &[PathBuf]| {
            if nodes.is_empty() {
                "none found".to_owned()
            } else {
                nodes
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        writeln!(f, "spidev: {}", list(&self.spidev))?;
        writeln!(f, "i2c-dev: {}", list(&self.i2c))?;
        for p in &self.problems {
            writeln!(f, "problem: {p}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inventory_runs_on_this_host_and_says_what_is_missing() {
        let inv = inventory();
        let text = inv.to_string();
        println!("{text}");
        if inv.gpiochips.is_empty() {
            assert!(text.contains("gpiochips: none found"), "{text}");
        }
        if inv.spidev.is_empty() {
            assert!(text.contains("spidev: none found"), "{text}");
        }
        for chip in &inv.gpiochips {
            assert_eq!(chip.lines.len() as u64, u64::from(chip.line_count));
        }
    }

    #[test]
    fn dev_nodes_sort_naturally() {
        let dir = std::env::temp_dir().join(format!("lichen-inv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        for n in ["i2c-10", "i2c-2", "i2c-1", "spidev0.0", "tty0"] {
            std::fs::write(dir.join(n), b"").expect("file");
        }
        let mut problems = Vec::new();
        let i2c = dev_nodes(&dir, "i2c-", &mut problems);
        let names: Vec<_> = i2c
            .iter()
            .map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        std::fs::remove_dir_all(&dir).expect("cleanup");
        assert_eq!(
            names,
            [
                Some("i2c-1".into()),
                Some("i2c-2".into()),
                Some("i2c-10".into())
            ]
        );
        assert!(problems.is_empty());
    }
}
