//! The store's garbage collection and figures over the API: `POST /api/gc` (a committer's)
//! runs one collection on the replay pool while captures go on; `GET /api/stats` computes
//! the figures. Both leave the figures in the node's status. The file is not compacted
//! while the node holds it: the space a collection frees is reused by later writes
//! (`kairos gc` on the data directory, with the node stopped, also shrinks the file).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::response::{IntoResponse, Response};
use kairos_store::GcOptions;

use crate::Shared;
use crate::api::ApiError;
use crate::wire::StoreFiguresJson;

#[utoipa::path(post, path = "/api/gc", request_body(content = Object, description = "{dry_run, max_repack_bytes}: both optional, {} runs with the defaults"), responses(
    (status = 200, description = "What the collection removed and repacked: objects, bytes, segments, disk before and after"),
    (status = 409, description = "A collection is already running", body = crate::wire::ErrorBody)))]
pub async fn gc(
    State(shared): State<Arc<Shared>>,
    payload: Result<Json<GcOptions>, JsonRejection>,
) -> Result<Response, ApiError> {
    let options = crate::api::json_input(payload)?;
    let worker = shared.clone();
    let report = shared
        .replay
        .run(move || {
            // On a thread of its own at the lowest CPU priority: captures, commits and
            // requests go first (a pool thread's priority could not be raised again).
            std::thread::scope(|scope| {
                scope
                    .spawn(|| {
                        lowest_cpu_priority();
                        let report = worker.service().gc(&options)?;
                        if !options.dry_run {
                            worker.refresh_figures();
                        }
                        Ok(report)
                    })
                    .join()
                    .unwrap_or_else(|_| Err(ApiError::internal("the collection panicked")))
            })
        })
        .await?;
    Ok(Json(report).into_response())
}

#[utoipa::path(get, path = "/api/stats", responses((status = 200, description = "Store figures: frames, objects, bytes raw / stored / on disk, dedup ratio, dictionaries, reclaimable bytes")))]
pub async fn stats(State(shared): State<Arc<Shared>>) -> Result<Response, ApiError> {
    let worker = shared.clone();
    let figures = shared
        .replay
        .run(move || {
            let figures = worker.service().stats()?;
            worker.remember_figures(figures.clone());
            Ok(figures)
        })
        .await?;
    Ok(Json(figures).into_response())
}

/// Lowers the calling thread's CPU priority to the lowest (nice 19); failing to is harmless.
fn lowest_cpu_priority() {
    // SAFETY: gettid(2) and setpriority(2) take and return plain integers; no memory is shared.
    let lowered = unsafe {
        let thread = libc::gettid() as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, thread, 19)
    };
    if lowered != 0 {
        tracing::debug!("the collection runs at the node's own priority");
    }
}

impl Shared {
    /// Keeps `figures` for the status endpoint.
    pub fn remember_figures(&self, figures: kairos_store::StoreFigures) {
        *self.figures.lock().unwrap_or_else(|p| p.into_inner()) = Some(StoreFiguresJson {
            computed_at: kairos_core::Instant::now(),
            figures,
        });
    }

    /// Computes the figures again (on the caller's thread) and keeps them; a failure is
    /// logged and leaves the last figures.
    pub fn refresh_figures(&self) {
        match self.service().stats() {
            Ok(figures) => self.remember_figures(figures),
            Err(error) => tracing::warn!(%error, "computing the store's figures"),
        }
    }
}
