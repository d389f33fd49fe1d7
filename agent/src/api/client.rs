//! Client of the local API, used by the CLI verbs.
