//! HTTP server of the local API.
