//! openraft's snapshot data: a file, or a snapshot directory packed into one when first read.
//!
//! openraft asks the state machine for its current snapshot in two places: when a follower
//! needs one (and reads the data), and once at start-up, for the meta alone
//! (`get_initial_state` in openraft's `storage/helper.rs`). Packing the bundle is as costly as
//! copying the whole chat state, so [`SnapshotData::lazy`] defers it to the first read, write
//! or seek: a node starts without packing anything.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

use crate::state_machine::{BundleSource, SnapshotFiles};

/// A snapshot's bytes: see the module documentation.
#[derive(Debug)]
pub struct SnapshotData {
    state: State,
    /// A seek asked for before the file existed, done once it does.
    pending_seek: Option<io::SeekFrom>,
}

#[derive(Debug)]
enum State {
    /// Not packed yet.
    Lazy {
        files: Arc<SnapshotFiles>,
        source: BundleSource,
    },
    /// Being packed on a blocking thread.
    Packing(tokio::task::JoinHandle<io::Result<std::fs::File>>),
    /// The bundle.
    File(tokio::fs::File),
    /// Packing failed; later calls fail too.
    Failed(io::ErrorKind, String),
}

impl SnapshotData {
    /// Data held in `file` (a bundle being received, or one already packed).
    pub fn file(file: tokio::fs::File) -> SnapshotData {
        SnapshotData {
            state: State::File(file),
            pending_seek: None,
        }
    }

    /// The bundle of `source`, packed when first used.
    pub(crate) fn lazy(files: Arc<SnapshotFiles>, source: BundleSource) -> SnapshotData {
        SnapshotData {
            state: State::Lazy { files, source },
            pending_seek: None,
        }
    }

    /// Whether the bundle has been packed (or was a file from the start).
    pub fn is_packed(&self) -> bool {
        matches!(self.state, State::File(_))
    }

    /// The bundle as a file, packed first if it was not.
    pub async fn into_std(mut self) -> io::Result<std::fs::File> {
        std::future::poll_fn(|cx| self.poll_file(cx).map_ok(|_| ())).await?;
        match self.state {
            State::File(file) => Ok(file.into_std().await),
            _ => unreachable!("poll_file returned Ready(Ok) with a file"),
        }
    }

    /// Drives packing to its end; then the file, with any seek asked for meanwhile started.
    fn poll_file(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<&mut tokio::fs::File>> {
        loop {
            match &mut self.state {
                State::Lazy { files, source } => {
                    let (files, source) = (files.clone(), source.clone());
                    self.state = State::Packing(tokio::task::spawn_blocking(move || {
                        files.open_bundle(&source)
                    }));
                }
                State::Packing(job) => {
                    let packed = match ready!(Pin::new(job).poll(cx)) {
                        Ok(result) => result,
                        Err(e) => Err(io::Error::other(e)),
                    };
                    self.state = match packed {
                        Ok(file) => State::File(tokio::fs::File::from_std(file)),
                        Err(e) => State::Failed(e.kind(), e.to_string()),
                    };
                }
                State::Failed(kind, why) => {
                    return Poll::Ready(Err(io::Error::new(*kind, why.clone())));
                }
                State::File(_) => break,
            }
        }
        let State::File(file) = &mut self.state else {
            unreachable!("the loop breaks only on a file")
        };
        if let Some(pos) = self.pending_seek.take() {
            Pin::new(&mut *file).start_seek(pos)?;
        }
        Poll::Ready(Ok(file))
    }
}

use std::future::Future;

impl AsyncRead for SnapshotData {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let file = ready!(self.get_mut().poll_file(cx))?;
        Pin::new(file).poll_read(cx, buf)
    }
}

impl AsyncWrite for SnapshotData {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let file = ready!(self.get_mut().poll_file(cx))?;
        Pin::new(file).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let file = ready!(self.get_mut().poll_file(cx))?;
        Pin::new(file).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let file = ready!(self.get_mut().poll_file(cx))?;
        Pin::new(file).poll_shutdown(cx)
    }
}

impl AsyncSeek for SnapshotData {
    fn start_seek(self: Pin<&mut Self>, position: io::SeekFrom) -> io::Result<()> {
        let this = self.get_mut();
        match &mut this.state {
            State::File(file) => Pin::new(file).start_seek(position),
            // Started by `poll_complete`, once the file exists.
            _ => {
                this.pending_seek = Some(position);
                Ok(())
            }
        }
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        let file = ready!(self.get_mut().poll_file(cx))?;
        Pin::new(file).poll_complete(cx)
    }
}
