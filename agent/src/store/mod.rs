//! The SQLite state store.
