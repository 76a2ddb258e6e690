//! [`Channel`] over a browser `RTCDataChannel`: received messages wait in a bounded queue (a
//! data channel cannot push back on its sender, so a reader that falls more than
//! [`MAX_QUEUED`] behind has its stream reset), and sends wait while more than
//! [`MAX_BUFFERED`] bytes are still in the channel's send buffer.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use js_sys::{ArrayBuffer, Uint8Array};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::Closure;
use web_sys::{MessageEvent, RtcDataChannel, RtcDataChannelState, RtcDataChannelType};

use super::stream::Channel;

/// Received bytes a data channel holds for a reader that has not read them.
pub const MAX_QUEUED: usize = 4 << 20;
/// Bytes in the send buffer past which a writer waits for it to drain.
pub const MAX_BUFFERED: u32 = 1 << 20;

#[derive(Default)]
struct Shared {
    queue: VecDeque<Vec<u8>>,
    queued: usize,
    overflowed: bool,
    closed: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

impl Shared {
    fn wake_all(&mut self) {
        if let Some(w) = self.reader.take() {
            w.wake();
        }
        if let Some(w) = self.writer.take() {
            w.wake();
        }
    }
}

type Callback<T> = Closure<dyn FnMut(T)>;

pub struct DataChannel {
    inner: RtcDataChannel,
    shared: Rc<RefCell<Shared>>,
    _on_open: Callback<web_sys::Event>,
    _on_message: Callback<MessageEvent>,
    _on_close: Callback<web_sys::Event>,
    _on_low: Callback<web_sys::Event>,
}

impl std::fmt::Debug for DataChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataChannel")
            .field("label", &self.inner.label())
            .finish_non_exhaustive()
    }
}

impl DataChannel {
    pub fn new(inner: RtcDataChannel) -> Self {
        inner.set_binary_type(RtcDataChannelType::Arraybuffer);
        inner.set_buffered_amount_low_threshold(0);
        let shared = Rc::new(RefCell::new(Shared::default()));
        let on_open = {
            let shared = shared.clone();
            Closure::new(move |_: web_sys::Event| shared.borrow_mut().wake_all())
        };
        let on_message = {
            let shared = shared.clone();
            Closure::new(move |event: MessageEvent| {
                let Ok(buffer) = event.data().dyn_into::<ArrayBuffer>() else {
                    return; // text messages are not part of the protocol
                };
                let bytes = Uint8Array::new(&buffer).to_vec();
                let mut s = shared.borrow_mut();
                if s.queued + bytes.len() > MAX_QUEUED {
                    s.overflowed = true;
                } else {
                    s.queued += bytes.len();
                    s.queue.push_back(bytes);
                }
                if let Some(w) = s.reader.take() {
                    w.wake();
                }
            })
        };
        let on_close = {
            let shared = shared.clone();
            Closure::new(move |_: web_sys::Event| {
                let mut s = shared.borrow_mut();
                s.closed = true;
                s.wake_all();
            })
        };
        let on_low = {
            let shared = shared.clone();
            Closure::new(move |_: web_sys::Event| {
                if let Some(w) = shared.borrow_mut().writer.take() {
                    w.wake();
                }
            })
        };
        inner.set_onopen(Some(on_open.as_ref().unchecked_ref()));
        inner.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
        inner.set_onclose(Some(on_close.as_ref().unchecked_ref()));
        inner.set_onerror(Some(on_close.as_ref().unchecked_ref()));
        inner.set_onbufferedamountlow(Some(on_low.as_ref().unchecked_ref()));
        Self {
            inner,
            shared,
            _on_open: on_open,
            _on_message: on_message,
            _on_close: on_close,
            _on_low: on_low,
        }
    }
}

impl Channel for DataChannel {
    fn poll_send_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.inner.ready_state() {
            RtcDataChannelState::Connecting => {
                self.shared.borrow_mut().writer = Some(cx.waker().clone());
                Poll::Pending
            }
            RtcDataChannelState::Open => {
                if self.inner.buffered_amount() > MAX_BUFFERED {
                    self.shared.borrow_mut().writer = Some(cx.waker().clone());
                    Poll::Pending
                } else {
                    Poll::Ready(Ok(()))
                }
            }
            _ => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn send(&mut self, message: &[u8]) -> io::Result<()> {
        self.inner
            .send_with_u8_array(message)
            .map_err(|_| io::ErrorKind::BrokenPipe.into())
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Vec<u8>>>> {
        let mut s = self.shared.borrow_mut();
        if let Some(message) = s.queue.pop_front() {
            s.queued -= message.len();
            return Poll::Ready(Some(Ok(message)));
        }
        if s.overflowed {
            return Poll::Ready(Some(Err(io::Error::other(
                "the remote sent more than a reader that is not reading holds",
            ))));
        }
        if s.closed {
            return Poll::Ready(None);
        }
        s.reader = Some(cx.waker().clone());
        Poll::Pending
    }

    fn poll_flushed(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.inner.buffered_amount() == 0 || self.shared.borrow().closed {
            return Poll::Ready(Ok(()));
        }
        self.shared.borrow_mut().writer = Some(cx.waker().clone());
        Poll::Pending
    }

    fn close(&mut self) {
        self.inner.close();
    }
}

impl Drop for DataChannel {
    fn drop(&mut self) {
        self.inner.set_onopen(None);
        self.inner.set_onmessage(None);
        self.inner.set_onclose(None);
        self.inner.set_onerror(None);
        self.inner.set_onbufferedamountlow(None);
    }
}
