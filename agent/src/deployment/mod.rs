//! Deployment files: schema, parsing with located errors, static validation.
