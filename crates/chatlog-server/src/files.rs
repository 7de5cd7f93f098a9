//! Files over HTTP (PROTOCOL.md "Files"): uploads are streamed to a temporary file under the
//! data directory while their SHA-256 is computed, then renamed into a content-addressed blob
//! store (`files/<sha[0..2]>/<sha>`, [`chatlog_raft::blobs::BlobStore`]; the same bytes are
//! stored once). In a cluster, an upload is copied to a majority of the voters before its
//! metadata is proposed, and a node that lacks a file's bytes fetches them from a peer when
//! the file is first downloaded there (see [`chatlog_raft::blobs`]). The file id is derived
//! from the uploader and the content hash (`f` + 32 hex digits of SHA-256(uploader, 0, sha)):
//! stable for a re-upload by the same user, distinct per uploader (so each upload keeps its
//! own access rule), and not guessable without the bytes. Metadata goes through the engine's
//! log like everything durable; access is checked by the engine (uploader, or a member of a
//! chat with a message referencing the file), and anyone else gets 404.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chatlog::engine::FileMeta;
use chatlog_raft::blobs::BlobStore;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::App;

/// Hex digits of a file id after the `f`.
const ID_HEX_DIGITS: usize = 32;
/// Longest stored content type.
const CONTENT_TYPE_BYTES_MAX: usize = 255;

/// The blob store's directory.
pub fn files_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("files")
}

/// The blob store in `data_dir`.
fn blobs(data_dir: &Path) -> BlobStore {
    BlobStore::new(files_dir(data_dir))
}

/// The id of `sha` uploaded by `user`.
pub fn file_id(user: &str, sha: &str) -> String {
    let mut h = Sha256::new();
    h.update(user.as_bytes());
    h.update([0]);
    h.update(sha.as_bytes());
    let digest = hex::encode(h.finalize());
    format!("f{}", &digest[..ID_HEX_DIGITS])
}

/// Whether `id` has the shape of a file id (checked before any lookup: no path traversal).
pub fn valid_id(id: &str) -> bool {
    id.len() == ID_HEX_DIGITS + 1
        && id.starts_with('f')
        && id[1..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn json_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(serde_json::json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

fn bearer_user(app: &App, headers: &HeaderMap) -> Result<String, Box<Response>> {
    let unauthorized = |m: &str| Box::new(json_error(StatusCode::UNAUTHORIZED, "unauthorized", m));
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| unauthorized("missing Authorization: Bearer <token>"))?
        .to_str()
        .map_err(|_| unauthorized("Authorization header is not text"))?;
    let token = value
        .strip_prefix("Bearer ")
        .ok_or_else(|| unauthorized("Authorization must be `Bearer <token>`"))?;
    app.auth
        .verify(token.trim(), crate::auth::secs(app.now_ms()))
        .map(|c| c.sub)
        .map_err(|e| unauthorized(&e.to_string()))
}

/// `POST /v1/files`.
pub async fn upload(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    let user = match bearer_user(&app, &headers) {
        Ok(u) => u,
        Err(r) => return *r,
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= CONTENT_TYPE_BYTES_MAX)
        .unwrap_or("application/octet-stream")
        .to_owned();
    let limit = app.config.max_file_bytes;
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit
    {
        return json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            &format!("file of {len} bytes is above the limit of {limit}"),
        );
    }
    let store = blobs(&app.config.data_dir);
    match store_upload(&store, body, limit).await {
        Ok(Stored::TooLarge) => json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            &format!("file is above the limit of {limit} bytes"),
        ),
        Ok(Stored::Done { sha, size }) => {
            if let Some(node) = &app.cluster {
                let copied = match tokio::fs::read(store.path(&sha)).await {
                    Ok(bytes) => node.replicate_blob(&sha, bytes.into()).await,
                    Err(e) => Err(format!("reading the stored upload: {e}")),
                };
                if let Err(why) = copied {
                    return json_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "unavailable",
                        &format!("the upload is not stored durably: {why}"),
                    );
                }
            }
            let meta = FileMeta {
                id: file_id(&user, &sha),
                uploader: user,
                size,
                sha256: sha,
                content_type,
            };
            match app.engine().register_file_ticket(meta.clone()).await {
                Ok(_) => (
                    StatusCode::CREATED,
                    axum::Json(serde_json::json!({
                        "file": meta.id,
                        "size": meta.size,
                        "sha256": meta.sha256,
                        "content_type": meta.content_type,
                    })),
                )
                    .into_response(),
                Err(e) => {
                    let code = crate::protocol::Code::of(&e);
                    json_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        code.as_str(),
                        &e.to_string(),
                    )
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "upload failed");
            json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                &format!("storing the upload failed: {e}"),
            )
        }
    }
}

enum Stored {
    Done { sha: String, size: u64 },
    TooLarge,
}

async fn store_upload(store: &BlobStore, body: Body, limit: u64) -> std::io::Result<Stored> {
    let tmp = store.temp_path().await?;
    let result = write_stream(&tmp, body, limit).await;
    let (sha, size) = match result {
        Ok(Some(done)) => done,
        Ok(None) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Ok(Stored::TooLarge);
        }
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
    };
    store.adopt(&tmp, &sha).await?;
    Ok(Stored::Done { sha, size })
}

/// Streams `body` into `path`, fsyncs it; `None` if it exceeded `limit`.
async fn write_stream(
    path: &Path,
    body: Body,
    limit: u64,
) -> std::io::Result<Option<(String, u64)>> {
    let mut file = tokio::fs::File::create(path).await?;
    let mut hasher = Sha256::new();
    let mut size: u64 = 0;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(std::io::Error::other)?;
        size += chunk.len() as u64;
        if size > limit {
            return Ok(None);
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await?;
    }
    file.sync_all().await?;
    Ok(Some((hex::encode(hasher.finalize()), size)))
}

/// `GET /v1/files/{id}`.
pub async fn download(
    State(app): State<Arc<App>>,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let user = match bearer_user(&app, &headers) {
        Ok(u) => u,
        Err(r) => return *r,
    };
    let not_found = || json_error(StatusCode::NOT_FOUND, "not_found", "no such file");
    if !valid_id(&id) {
        return not_found();
    }
    let engine = app.engine();
    let lookup = tokio::task::spawn_blocking(move || engine.file(&user, &id)).await;
    let meta = match lookup {
        Ok(Ok(meta)) => meta,
        Ok(Err(chatlog::engine::ChatError::NotFound(_))) => return not_found(),
        Ok(Err(e)) => {
            return json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                &e.to_string(),
            );
        }
        Err(e) => {
            return json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                &e.to_string(),
            );
        }
    };
    let store = blobs(&app.config.data_dir);
    let path = store.path(&meta.sha256);
    let body = match tokio::fs::File::open(&path).await {
        Ok(f) => Body::from_stream(tokio_util::io::ReaderStream::new(f)),
        Err(e) => match &app.cluster {
            // Not copied here yet (this node was down during the upload, was wiped, or
            // joined later): a peer has it.
            Some(node) if e.kind() == std::io::ErrorKind::NotFound => {
                let Some(bytes) = node.fetch_blob(&meta.sha256).await else {
                    return json_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "unavailable",
                        "the file's content is on no reachable node",
                    );
                };
                if let Err(e) = store.put(&meta.sha256, &bytes).await {
                    tracing::warn!(error = %e, "keeping a file fetched from a peer failed");
                }
                Body::from(bytes)
            }
            _ => {
                tracing::error!(error = %e, path = %path.display(), "file metadata without blob");
                return json_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "file content missing",
                );
            }
        },
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, meta.content_type)
        .header(header::CONTENT_LENGTH, meta.size)
        .header("x-content-type-options", "nosniff")
        // Uploaded content is never run as a page of this origin.
        .header("content-security-policy", "sandbox")
        .body(body)
        .unwrap_or_else(|_| json_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "response"))
}

/// Files fetched from peers at once by [`repair_missing`].
const REPAIRS_IN_FLIGHT: usize = 4;

/// Files' metadata read per page by [`repair_missing`]'s scan.
const SCAN_PAGE: usize = 256;

/// In a cluster: copies from a peer every file this node has the metadata of but not the
/// bytes, so that each file ends up on every node and not only on the majority that
/// acknowledged it. A node misses a file's bytes when it was down during the upload, when the
/// upload's copies reached a majority without it, or when it caught up through a snapshot
/// (which holds the metadata only). At start and after each snapshot install it scans every
/// file; meanwhile it checks each upload it applies. Runs until the engine cell closes.
pub async fn repair_missing(
    cell: Arc<chatlog_raft::EngineCell>,
    node: Arc<chatlog_raft::ClusterNode>,
    data_dir: PathBuf,
) {
    let store = blobs(&data_dir);
    let slots = Arc::new(tokio::sync::Semaphore::new(REPAIRS_IN_FLIGHT));
    cell.follow(
        |engine| repair_on(engine, node.clone(), store.clone(), slots.clone()),
        || {},
    )
    .await;
}

/// Repairs the files of one engine: scans them all, and checks each new one as it commits.
/// Ends when the engine closes.
async fn repair_on(
    engine: Arc<chatlog::engine::Engine>,
    node: Arc<chatlog_raft::ClusterNode>,
    store: BlobStore,
    slots: Arc<tokio::sync::Semaphore>,
) {
    let mut subscription = engine.subscribe();
    let scan = scan_for_missing(engine, node.clone(), store.clone(), slots.clone());
    let follow = async {
        loop {
            let meta = match subscription.recv().await {
                Ok(committed) => match &committed.record {
                    chatlog::engine::Record::File(meta) => meta.clone(),
                    _ => continue,
                },
                Err(chatlog::engine::SubscriptionError::Lagged { .. }) => continue,
                Err(_) => return,
            };
            copy_if_missing(&node, &store, &slots, meta).await;
        }
    };
    // The scan ends once it has seen every file; new ones keep coming until the engine closes.
    tokio::join!(scan, follow);
}

/// Checks every file's bytes, a page of metadata at a time.
async fn scan_for_missing(
    engine: Arc<chatlog::engine::Engine>,
    node: Arc<chatlog_raft::ClusterNode>,
    store: BlobStore,
    slots: Arc<tokio::sync::Semaphore>,
) {
    let mut after: Option<String> = None;
    loop {
        let page = {
            let engine = engine.clone();
            let after = after.clone();
            tokio::task::spawn_blocking(move || engine.files_page(after.as_deref(), SCAN_PAGE))
                .await
        };
        let page = match page {
            Ok(Ok(page)) => page,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "scanning files for missing content failed");
                return;
            }
            Err(_) => return,
        };
        let Some(last) = page.last() else {
            return;
        };
        after = Some(last.id.clone());
        for meta in page {
            copy_if_missing(&node, &store, &slots, meta).await;
        }
    }
}

/// Starts copying `meta`'s bytes from a peer if this node lacks them (at most
/// [`REPAIRS_IN_FLIGHT`] at once; waits for a slot).
async fn copy_if_missing(
    node: &Arc<chatlog_raft::ClusterNode>,
    store: &BlobStore,
    slots: &Arc<tokio::sync::Semaphore>,
    meta: FileMeta,
) {
    if store.contains(&meta.sha256).await {
        return;
    }
    let Ok(slot) = slots.clone().acquire_owned().await else {
        return;
    };
    let (node, store) = (node.clone(), store.clone());
    tokio::spawn(async move {
        let _slot = slot;
        // The uploading node may still be copying it here, or hold it alone for a moment.
        for attempt in 0..5u32 {
            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            if store.contains(&meta.sha256).await {
                return;
            }
            if let Some(bytes) = node.fetch_blob(&meta.sha256).await {
                if let Err(e) = store.put(&meta.sha256, &bytes).await {
                    tracing::warn!(error = %e, file = %meta.id, "keeping a repaired file failed");
                }
                return;
            }
        }
        tracing::warn!(
            file = %meta.id,
            "no peer had a missing file's content; it is fetched again when downloaded"
        );
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_per_uploader_and_checked_strictly() {
        let sha = "ab".repeat(32);
        let a = file_id("alice", &sha);
        assert_eq!(a, file_id("alice", &sha));
        assert_ne!(a, file_id("bob", &sha));
        assert!(valid_id(&a));
        assert!(!valid_id("f../../etc/passwd"));
        assert!(!valid_id(&a.to_uppercase()));
        assert!(!valid_id(&a[..ID_HEX_DIGITS]));
        assert!(!valid_id(""));
    }
}
