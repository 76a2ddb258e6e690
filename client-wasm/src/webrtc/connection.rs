//! A libp2p connection over one browser `RTCPeerConnection`: every libp2p stream is a data
//! channel with the spec's label `""`, opened in-band by whichever side opens the stream
//! (`ondatachannel` on the other). The handshake's `init` channel is not a stream.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use futures::{AsyncRead, AsyncWrite};
use libp2p::core::muxing::{StreamMuxer, StreamMuxerEvent};
use send_wrapper::SendWrapper;
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::Closure;
use web_sys::{RtcDataChannelEvent, RtcPeerConnection, RtcPeerConnectionState};

use super::channel::DataChannel;
use super::stream::Stream;

/// Inbound channels the remote may open before we accept them as streams.
const MAX_PENDING_INBOUND: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the WebRTC connection is {0}")]
    Closed(&'static str),
}

#[derive(Default)]
struct Shared {
    inbound: VecDeque<web_sys::RtcDataChannel>,
    failed: Option<&'static str>,
    waker: Option<Waker>,
}

struct Inner {
    pc: RtcPeerConnection,
    shared: Rc<RefCell<Shared>>,
    _on_channel: Closure<dyn FnMut(RtcDataChannelEvent)>,
    on_state: Option<Closure<dyn FnMut(web_sys::Event)>>,
    closed: bool,
}

/// The connection handed to the swarm. The browser types are not `Send`; a wasm page has one
/// thread, and `SendWrapper` panics if that ever changes.
pub struct Connection {
    inner: SendWrapper<Inner>,
}

/// One libp2p stream of a [`Connection`].
pub struct Substream {
    inner: SendWrapper<Stream<DataChannel>>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Substream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl Connection {
    /// The browser's peer connection (for its stats).
    pub fn peer_connection(&self) -> &RtcPeerConnection {
        &self.inner.pc
    }

    /// Takes over `pc` before its handshake starts: the remote may open its first stream the
    /// moment its side is `connected`, before ours is, and a `datachannel` event with no
    /// handler is lost (a js-libp2p dialer's identify then times out). Channels wait here
    /// until the swarm accepts them; call [`Connection::established`] once connected.
    pub fn new(pc: RtcPeerConnection) -> Self {
        let shared = Rc::new(RefCell::new(Shared::default()));
        let on_channel = {
            let shared = shared.clone();
            Closure::new(move |event: RtcDataChannelEvent| {
                let channel = event.channel();
                if channel.label() == "init" {
                    return;
                }
                let mut s = shared.borrow_mut();
                if s.inbound.len() >= MAX_PENDING_INBOUND {
                    tracing::warn!("a peer opened more data channels than we accept: closing one");
                    channel.close();
                    return;
                }
                s.inbound.push_back(channel);
                if let Some(w) = s.waker.take() {
                    w.wake();
                }
            })
        };
        pc.set_ondatachannel(Some(on_channel.as_ref().unchecked_ref()));
        Self {
            inner: SendWrapper::new(Inner {
                pc,
                shared,
                _on_channel: on_channel,
                on_state: None,
                closed: false,
            }),
        }
    }

    /// The handshake is done (and its own state handler gone): from now on a failed, closed
    /// or disconnected peer connection ends this connection.
    pub fn established(mut self) -> Self {
        let inner = &mut *self.inner;
        let shared = inner.shared.clone();
        let pc = inner.pc.clone();
        let check = move || {
            let failed = match pc.connection_state() {
                RtcPeerConnectionState::Failed => Some("failed"),
                RtcPeerConnectionState::Closed => Some("closed"),
                RtcPeerConnectionState::Disconnected => Some("disconnected"),
                _ => None,
            };
            if let Some(state) = failed {
                let mut s = shared.borrow_mut();
                s.failed = Some(state);
                if let Some(w) = s.waker.take() {
                    w.wake();
                }
            }
        };
        // The state may have changed between the handshake's end and now.
        check();
        let on_state: Closure<dyn FnMut(web_sys::Event)> = Closure::new(move |_| check());
        inner
            .pc
            .set_onconnectionstatechange(Some(on_state.as_ref().unchecked_ref()));
        inner.on_state = Some(on_state);
        self
    }
}

impl Inner {
    fn close(&mut self) {
        if !self.closed {
            self.closed = true;
            self.pc.set_ondatachannel(None);
            self.pc.set_onconnectionstatechange(None);
            self.pc.close();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.close();
    }
}

impl StreamMuxer for Connection {
    type Substream = Substream;
    type Error = Error;

    fn poll_inbound(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        let inner = &mut *self.get_mut().inner;
        let mut s = inner.shared.borrow_mut();
        if let Some(state) = s.failed {
            return Poll::Ready(Err(Error::Closed(state)));
        }
        match s.inbound.pop_front() {
            Some(channel) => Poll::Ready(Ok(Substream {
                inner: SendWrapper::new(Stream::new(DataChannel::new(channel))),
            })),
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    fn poll_outbound(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        let inner = &mut *self.get_mut().inner;
        if let Some(state) = inner.shared.borrow().failed {
            return Poll::Ready(Err(Error::Closed(state)));
        }
        // The spec's label for libp2p streams is the empty string; the stream waits for the
        // channel to open before its first write.
        let channel = inner.pc.create_data_channel("");
        Poll::Ready(Ok(Substream {
            inner: SendWrapper::new(Stream::new(DataChannel::new(channel))),
        }))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.get_mut().inner.close();
        Poll::Ready(Ok(()))
    }

    fn poll(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<StreamMuxerEvent, Self::Error>> {
        let inner = &mut *self.get_mut().inner;
        let mut s = inner.shared.borrow_mut();
        if let Some(state) = s.failed {
            return Poll::Ready(Err(Error::Closed(state)));
        }
        // `poll_inbound` and `poll` share the waker slot: wake both callers' task.
        s.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl AsyncRead for Substream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Substream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_close(cx)
    }
}
