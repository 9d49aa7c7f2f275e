//! What a cowsnapd RPC can fail with, and the gRPC status each failure is
//! sent as. Every variant names the container, checkpoint or path
//! concerned.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("container {id:?} not found in namespace {namespace:?}")]
    ContainerNotFound { namespace: String, id: String },
    #[error("checkpoint {reference:?} not found in namespace {namespace:?}")]
    CheckpointNotFound {
        namespace: String,
        reference: String,
    },
    #[error("checkpoint ref {reference:?} is malformed: {reason}")]
    MalformedReference { reference: String, reason: String },
    #[error("{field} {value:?} is invalid: {reason}")]
    InvalidArgument {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("container {id:?} runs under runtime {runtime:?}, not {expected}: cowsnapd checkpoints only its own runtime's containers")]
    OtherRuntime {
        id: String,
        runtime: String,
        expected: &'static str,
    },
    #[error("container {id:?} has no running task to checkpoint{detail}")]
    NoRunningTask { id: String, detail: String },
    #[error("{what} already exists in namespace {namespace:?}")]
    AlreadyExists { namespace: String, what: String },
    #[error("image {reference:?} is not a checkpoint: {reason}")]
    NotACheckpoint { reference: String, reason: String },
    #[error("checkpoint {reference:?} holds no writable layer to apply (it was taken without include_rw_layer)")]
    NoRwLayer { reference: String },
    #[error(
        "checkpoint {reference:?} needs image {image:?}, which is not in namespace {namespace:?}"
    )]
    MissingImage {
        namespace: String,
        reference: String,
        image: String,
    },
    #[error("not supported yet: {0}")]
    NotSupportedYet(String),
    /// An import received data that does not match its checksums.
    #[error("{0}")]
    DataLoss(String),
    /// An import stream out of order (a gap, an unknown blob, no manifest).
    #[error("{0}")]
    BadStream(String),
    /// containerd answered with an error; its code is passed on. A
    /// checkpoint or restore the engine failed arrives so with the code the
    /// shim gave the engine's typed error (`cowsnap::engine_error`):
    /// UNIMPLEMENTED for a refusal (an fd of a kind restore cannot reopen),
    /// FAILED_PRECONDITION, INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE
    /// (containerd 1.6 turns the shim's RESOURCE_EXHAUSTED and INTERNAL
    /// into UNKNOWN).
    #[error("{action}: {}", .status.message())]
    Containerd { action: String, status: Status },
    #[error("migration target {target} is unreachable: {detail}")]
    TargetUnavailable { target: String, detail: String },
    /// A migration failed before the target ran the container; `after`
    /// says what became of the source.
    #[error("migration of container {id:?} to {target} failed: {cause}; {after}")]
    MigrationFailed {
        id: String,
        target: String,
        cause: Box<ApiError>,
        after: String,
    },
    #[error("containerd at {address} is unreachable: {detail}")]
    ContainerdUnavailable { address: String, detail: String },
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// A containerd failure of `action` (e.g. "checkpoint task of container
    /// \"web\""), keeping containerd's status code.
    pub fn containerd(action: impl Into<String>, status: Status) -> ApiError {
        ApiError::Containerd {
            action: action.into(),
            status,
        }
    }

    pub fn code(&self) -> Code {
        match self {
            ApiError::ContainerNotFound { .. } | ApiError::CheckpointNotFound { .. } => {
                Code::NotFound
            }
            ApiError::MalformedReference { .. }
            | ApiError::InvalidArgument { .. }
            | ApiError::NotACheckpoint { .. } => Code::InvalidArgument,
            ApiError::OtherRuntime { .. }
            | ApiError::NoRunningTask { .. }
            | ApiError::MissingImage { .. }
            | ApiError::NoRwLayer { .. } => Code::FailedPrecondition,
            ApiError::AlreadyExists { .. } => Code::AlreadyExists,
            ApiError::NotSupportedYet(_) => Code::Unimplemented,
            ApiError::DataLoss(_) => Code::DataLoss,
            ApiError::BadStream(_) => Code::InvalidArgument,
            ApiError::Containerd { status, .. } => status.code(),
            ApiError::ContainerdUnavailable { .. } | ApiError::TargetUnavailable { .. } => {
                Code::Unavailable
            }
            ApiError::MigrationFailed { cause, .. } => cause.code(),
            ApiError::Internal(_) => Code::Internal,
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}
