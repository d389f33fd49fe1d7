//! Hub URLs: `mqtt://host[:port]` and `mqtts://host[:port]`, as the node's `[hub] url` and the
//! operator's `--url` spell them.

use thiserror::Error;

/// A parsed hub URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubUrl {
    /// Whether it is `mqtts://`.
    pub tls: bool,
    /// Host name or address.
    pub host: String,
    /// Port (1883 for `mqtt://`, 8883 for `mqtts://` unless given).
    pub port: u16,
}

/// A hub URL that cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum UrlError {
    /// Neither `mqtt://` nor `mqtts://`.
    #[error("hub url {0:?} must start with mqtt:// or mqtts://")]
    Scheme(String),
    /// The port is not a number from 0 to 65535.
    #[error("hub url {url:?} has an invalid port {port:?}")]
    Port {
        /// The URL.
        url: String,
        /// What stood for the port.
        port: String,
    },
    /// No host, or a path after it.
    #[error("hub url {0:?} has no valid host")]
    Host(String),
}

impl HubUrl {
    /// Parses `mqtt://host[:port]` or `mqtts://host[:port]` (an IPv6 address in brackets).
    pub fn parse(url: &str) -> Result<HubUrl, UrlError> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("mqtt://") {
            (false, rest)
        } else {
            return Err(UrlError::Scheme(url.to_owned()));
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) => (
                host,
                port.parse::<u16>().map_err(|_| UrlError::Port {
                    url: url.to_owned(),
                    port: port.to_owned(),
                })?,
            ),
            None => (rest, if tls { 8883 } else { 1883 }),
        };
        if host.is_empty() || host.contains('/') {
            return Err(UrlError::Host(url.to_owned()));
        }
        Ok(HubUrl {
            tls,
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_default_ports() {
        assert_eq!(
            HubUrl::parse("mqtt://127.0.0.1:1999").unwrap(),
            HubUrl {
                tls: false,
                host: "127.0.0.1".into(),
                port: 1999
            }
        );
        assert_eq!(HubUrl::parse("mqtts://hub.example").unwrap().port, 8883);
        assert_eq!(HubUrl::parse("mqtt://hub").unwrap().port, 1883);
        assert_eq!(HubUrl::parse("mqtts://[::1]:8884").unwrap().host, "::1");
    }

    #[test]
    fn bad_urls_name_what_is_wrong() {
        let scheme = HubUrl::parse("http://hub").unwrap_err();
        assert!(
            scheme.to_string().contains("must start with mqtt://"),
            "{scheme}"
        );
        let port = HubUrl::parse("mqtt://hub:x").unwrap_err();
        assert!(port.to_string().contains("invalid port \"x\""), "{port}");
        let host = HubUrl::parse("mqtt://").unwrap_err();
        assert!(host.to_string().contains("no valid host"), "{host}");
    }
}
