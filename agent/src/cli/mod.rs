//! The command line: verbs, their options, and human or JSON output.
