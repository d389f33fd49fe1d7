//! The crate's one error type: every variant names the resource that failed.

use std::path::PathBuf;

/// What went wrong with a GPIO line, bus, device node or board profile.
///
/// Every message names the thing that failed (`line "GPIO17" not found on any gpiochip`,
/// `/dev/spidev0.0: permission denied`), so a caller can show it as is.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No gpiochip has a line with this label.
    #[error("line \"{label}\" not found on any gpiochip{}", no_chips_hint(*.chips_searched))]
    LineNotFound {
        /// The line label that was looked for.
        label: String,
        /// How many gpiochips were searched (0: the host has none).
        chips_searched: usize,
    },
    /// More than one gpiochip has a line with this label, so the choice would be a guess.
    #[error("line \"{label}\" is ambiguous: found on {}", .chips.join(" and "))]
    LineAmbiguous {
        /// The line label that was looked for.
        label: String,
        /// The chips (device paths) that carry a line with that label.
        chips: Vec<String>,
    },
    /// No gpiochip has this label.
    #[error("gpiochip labelled \"{label}\" not found")]
    ChipNotFound {
        /// The chip label that was looked for.
        label: String,
    },
    /// The line exists but something else holds it.
    #[error("line \"{label}\" is already in use{}", consumer_suffix(.consumer))]
    LineBusy {
        /// The line label.
        label: String,
        /// The consumer that holds it, when known.
        consumer: Option<String>,
    },
    /// The line was used in a way its request does not allow.
    #[error("line \"{label}\": {message}")]
    Line {
        /// The line label.
        label: String,
        /// What was wrong.
        message: String,
    },
    /// A device node exists but this process may not open it.
    #[error("{}: permission denied", .path.display())]
    PermissionDenied {
        /// The device node.
        path: PathBuf,
    },
    /// A device node does not exist.
    #[error("{}: no such device node", .path.display())]
    NodeMissing {
        /// The device node.
        path: PathBuf,
    },
    /// Any other I/O error on a device node.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The device node.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// An I2C target did not acknowledge its address.
    #[error("{bus}: no device acknowledged address {address:#04x}")]
    NoAcknowledge {
        /// The bus name or device node.
        bus: String,
        /// The address that was not acknowledged.
        address: u16,
    },
    /// An I2C or SPI transfer was refused before it reached the bus.
    #[error("{bus}: {message}")]
    Bus {
        /// The bus name or device node.
        bus: String,
        /// What was wrong.
        message: String,
    },
    /// A board profile failed to parse or to validate.
    #[error("board profile \"{board}\": {message}")]
    Profile {
        /// The profile's name (or file) that failed.
        board: String,
        /// What was wrong.
        message: String,
    },
    /// The operation needs an operating system this build does not run on.
    #[error("{what} is only available on Linux")]
    Unsupported {
        /// What was asked for.
        what: String,
    },
}

fn no_chips_hint(chips_searched: usize) -> &'static str {
    if chips_searched == 0 {
        " (this host has no gpiochip)"
    } else {
        ""
    }
}

fn consumer_suffix(consumer: &Option<String>) -> String {
    match consumer {
        Some(c) if !c.is_empty() => format!(" (held by \"{c}\")"),
        _ => String::new(),
    }
}

impl Error {
    /// Classify an I/O error on the device node `path`: missing, permission denied, or other.
    pub fn from_io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        match source.kind() {
            std::io::ErrorKind::NotFound => Error::NodeMissing { path },
            std::io::ErrorKind::PermissionDenied => Error::PermissionDenied { path },
            _ => Error::Io { path, source },
        }
    }

    pub(crate) fn profile(board: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Profile {
            board: board.into(),
            message: message.into(),
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl embedded_hal::digital::Error for Error {
    fn kind(&self) -> embedded_hal::digital::ErrorKind {
        embedded_hal::digital::ErrorKind::Other
    }
}

impl embedded_hal::spi::Error for Error {
    fn kind(&self) -> embedded_hal::spi::ErrorKind {
        embedded_hal::spi::ErrorKind::Other
    }
}

impl embedded_hal::i2c::Error for Error {
    fn kind(&self) -> embedded_hal::i2c::ErrorKind {
        use embedded_hal::i2c::{ErrorKind, NoAcknowledgeSource};
        match self {
            Error::NoAcknowledge { .. } => ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address),
            _ => ErrorKind::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_resource() {
        let e = Error::LineNotFound {
            label: "GPIO17".into(),
            chips_searched: 2,
        };
        assert_eq!(e.to_string(), "line \"GPIO17\" not found on any gpiochip");
        let e = Error::LineNotFound {
            label: "GPIO17".into(),
            chips_searched: 0,
        };
        assert_eq!(
            e.to_string(),
            "line \"GPIO17\" not found on any gpiochip (this host has no gpiochip)"
        );
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert_eq!(
            Error::from_io("/dev/spidev0.0", denied).to_string(),
            "/dev/spidev0.0: permission denied"
        );
        let missing = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert_eq!(
            Error::from_io("/dev/i2c-1", missing).to_string(),
            "/dev/i2c-1: no such device node"
        );
        let busy = Error::LineBusy {
            label: "GPIO4".into(),
            consumer: Some("w1-gpio".into()),
        };
        assert_eq!(
            busy.to_string(),
            "line \"GPIO4\" is already in use (held by \"w1-gpio\")"
        );
    }
}
