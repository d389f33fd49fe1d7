//! What a DMI call can fail with, each error naming the field at fault, and its gRPC status.

/// A refused or failed DMI request. `Invalid` and `NotFound` change nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DmiError {
    /// Bad input (`InvalidArgument`): `field` is the path in the Device or DeviceModel, as
    /// `spec.protocol.configData.gpio[0].pin`.
    #[error("{field}: {message}")]
    Invalid {
        /// The field at fault.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// A named thing does not exist (`NotFound`): an unknown model, device or workload.
    #[error("{field}: {message}")]
    NotFound {
        /// The field that names it.
        field: String,
        /// What was not found.
        message: String,
    },
    /// The request collides with something that exists (`AlreadyExists`).
    #[error("{field}: {message}")]
    Conflict {
        /// The field that collides.
        field: String,
        /// With what.
        message: String,
    },
    /// The agent cannot take the request now (`Unavailable`); nothing changed, try again.
    #[error("{0}")]
    Unavailable(String),
    /// A failure inside Lichen (`Internal`).
    #[error("{0}")]
    Internal(String),
}

impl DmiError {
    /// An `Invalid` error for `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        DmiError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    /// A `NotFound` error for `field`.
    pub fn not_found(field: impl Into<String>, message: impl Into<String>) -> Self {
        DmiError::NotFound {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The field at fault, if the error has one.
    pub fn field(&self) -> Option<&str> {
        match self {
            DmiError::Invalid { field, .. }
            | DmiError::NotFound { field, .. }
            | DmiError::Conflict { field, .. } => Some(field),
            DmiError::Unavailable(_) | DmiError::Internal(_) => None,
        }
    }

    /// The same error with its field placed under `prefix` (`spec.properties[2]` + `.`).
    pub fn under(self, prefix: &str) -> Self {
        let join = |field: String| format!("{prefix}.{field}");
        match self {
            DmiError::Invalid { field, message } => DmiError::Invalid {
                field: join(field),
                message,
            },
            DmiError::NotFound { field, message } => DmiError::NotFound {
                field: join(field),
                message,
            },
            DmiError::Conflict { field, message } => DmiError::Conflict {
                field: join(field),
                message,
            },
            other => other,
        }
    }
}

impl From<DmiError> for tonic::Status {
    fn from(e: DmiError) -> Self {
        let text = e.to_string();
        match e {
            DmiError::Invalid { .. } => tonic::Status::invalid_argument(text),
            DmiError::NotFound { .. } => tonic::Status::not_found(text),
            DmiError::Conflict { .. } => tonic::Status::already_exists(text),
            DmiError::Unavailable(_) => tonic::Status::unavailable(text),
            DmiError::Internal(_) => tonic::Status::internal(text),
        }
    }
}
