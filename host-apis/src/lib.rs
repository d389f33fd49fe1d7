//! Lichen's host APIs.
