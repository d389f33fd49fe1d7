//! `lichen:device/telemetry`: records go to the pending writes of the current call.

use crate::DeviceState;
use crate::bindings::lichen::device::telemetry::{Error, Host};
use crate::state::{TelemetryRecord, now_ms};

impl Host for DeviceState {
    fn publish(&mut self, stream: String, payload: Vec<u8>) -> Result<(), Error> {
        validate_stream(&stream).map_err(Error::InvalidStream)?;
        if payload.len() > self.limits.max_telemetry_bytes {
            return Err(Error::PayloadTooLarge(
                u32::try_from(payload.len()).unwrap_or(u32::MAX),
            ));
        }
        if self.pending.telemetry.len() >= self.limits.max_records_per_call {
            return Err(Error::Other(format!(
                "more than {} records published while handling one event",
                self.limits.max_records_per_call
            )));
        }
        self.pending.telemetry.push(TelemetryRecord {
            stream,
            payload,
            created_at_ms: now_ms(),
        });
        Ok(())
    }
}

impl crate::bindings::lichen::device::types::Host for DeviceState {}

/// Checks a stream name: 1-64 bytes of ASCII letters, digits, `-`, `_` and `.`.
// The error stays words: it is the guest's `invalid-stream` WIT error message.
pub(crate) fn validate_stream(stream: &str) -> Result<(), String> {
    if stream.is_empty() || stream.len() > 64 {
        return Err(format!(
            "stream name must be 1 to 64 bytes long, got {} bytes",
            stream.len()
        ));
    }
    if let Some(bad) = stream
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "stream name {stream:?} has the character {bad:?}; use ASCII letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::validate_stream;

    #[test]
    fn stream_names_are_checked() {
        assert!(validate_stream("count").is_ok());
        assert!(validate_stream("env.temp_1-a").is_ok());
        assert!(validate_stream("").unwrap_err().contains("1 to 64"));
        assert!(validate_stream("a/b").unwrap_err().contains("'/'"));
        assert!(validate_stream(&"x".repeat(65)).is_err());
    }
}
