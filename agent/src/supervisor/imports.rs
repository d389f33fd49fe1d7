//! `lichen import`'s route from the agent's `Control::import` to its hub link's importer,
//! which verifies and applies the bundle (`hub::import`).

use std::path::PathBuf;

use tokio::sync::{mpsc, oneshot};

use crate::api::types::{ApiError, ImportReport, ImportRequest};

/// The answer to an import, sent back to the API caller.
pub(crate) type ImportReply = oneshot::Sender<Result<ImportReport, ApiError>>;

/// An import asked for through the API.
pub(crate) struct ImportJob {
    /// The bundle, as the caller named it.
    pub(crate) path: PathBuf,
    /// Where the answer goes.
    pub(crate) reply: ImportReply,
}

/// Where one agent's imports go: the importer of its hub link, set when the link starts. The
/// agent holds one ([`Agent::imports`](super::Agent::imports)) and its `Control::import` uses
/// it; clones share it. It lives with the supervisor, which the hub link fills in, so the
/// supervisor does not depend on the hub.
#[derive(Clone, Default)]
pub struct ImportRoute {
    jobs: std::sync::Arc<std::sync::OnceLock<mpsc::Sender<ImportJob>>>,
}

impl std::fmt::Debug for ImportRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImportRoute")
            .field("routed", &self.jobs.get().is_some())
            .finish()
    }
}

impl ImportRoute {
    /// Verifies a bundle exactly as a desired state from the hub (node, version, signature by
    /// a trusted key, every artifact's digest) and applies it; anything wrong changes nothing
    /// and is an `invalid` error (and reported by the hub link). Needs the `[hub]` section,
    /// whose node id and trusted keys the verification uses; works with the hub unreachable.
    pub async fn import_bundle(&self, req: ImportRequest) -> Result<ImportReport, ApiError> {
        let Some(imports) = self.jobs.get() else {
            return Err(ApiError::unavailable(
                "this agent has no [hub] section: importing a bundle needs hub.node-id and hub.trusted-keys to verify it",
            ));
        };
        let (reply, answer) = oneshot::channel();
        imports
            .send(ImportJob {
                path: req.path.into(),
                reply,
            })
            .await
            .map_err(|_| ApiError::unavailable("the hub link has stopped"))?;
        answer
            .await
            .map_err(|_| ApiError::internal("the hub link dropped the import"))?
    }

    /// Makes these imports go to `jobs`' receiver; false if a hub link already took them.
    pub(crate) fn route(&self, jobs: mpsc::Sender<ImportJob>) -> bool {
        self.jobs.set(jobs).is_ok()
    }
}
