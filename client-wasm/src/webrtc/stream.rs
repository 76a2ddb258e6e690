//! A libp2p stream over one WebRTC data channel, with the spec's framing and half-close: every
//! data-channel message is one length-prefixed [`Frame`] of at most 16 KiB; closing the write
//! half sends `FIN` and waits (at most [`FIN_ACK_TIMEOUT`]) for the `FIN_ACK` that a reader
//! sends when it sees `FIN`; a `STOP_SENDING` from the remote ends our write half; dropping a stream that
//! was not closed sends `RESET_STREAM`. The data channel itself sits behind [`Channel`], so the
//! state machine runs natively in tests and over `RTCDataChannel` in the browser.
//!
//! libp2p-webrtc-utils 0.5 (what libp2p 0.57 ships) has no `FIN_ACK` and refuses it as invalid
//! data, so it cannot talk to js-libp2p 3.x, which sends one for every `FIN`.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::{AsyncRead, AsyncWrite, FutureExt};
use futures_timer::Delay;

use super::message::{Flag, Frame, MAX_FRAME, MAX_PAYLOAD, take_prefixed};

/// How long closing the write half waits for the remote's `FIN_ACK` (js-libp2p's default).
pub const FIN_ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// How much received payload a writer takes in while looking for flags nobody reads yet.
const MAX_UNREAD: usize = 1 << 20;

/// A data channel seen as whole messages.
pub trait Channel: Unpin {
    /// Ready when the channel is open and its send buffer has room for another frame.
    fn poll_send_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Sends one data-channel message.
    fn send(&mut self, message: &[u8]) -> io::Result<()>;
    /// The next message received, `None` once the channel is closed. An error when the remote
    /// sent more than the channel buffers for a reader that does not read.
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Vec<u8>>>>;
    /// Ready when everything sent has left the send buffer.
    fn poll_flushed(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Closes the channel (both directions, for both sides).
    fn close(&mut self);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadState {
    Open,
    /// The remote sent `FIN` (or the channel closed): what is buffered is all there is.
    Finished,
    Reset,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteState {
    Open,
    /// We sent `FIN` and wait for `FIN_ACK`.
    FinSent,
    Closed,
    /// The remote sent `STOP_SENDING`.
    Stopped,
    Reset,
}

/// One libp2p stream over one data channel.
pub struct Stream<C: Channel> {
    channel: C,
    /// Received bytes not yet split into frames (a frame may span data-channel messages).
    incoming: Vec<u8>,
    /// Payload ready for the reader.
    data: VecDeque<u8>,
    read: ReadState,
    write: WriteState,
    /// Flags to send as soon as the channel takes them (a `FIN_ACK` we owe).
    owed: VecDeque<Flag>,
    fin_ack_timer: Option<Delay>,
    channel_closed: bool,
}

impl<C: Channel> Stream<C> {
    pub fn new(channel: C) -> Self {
        Self {
            channel,
            incoming: Vec::new(),
            data: VecDeque::new(),
            read: ReadState::Open,
            write: WriteState::Open,
            owed: VecDeque::new(),
            fin_ack_timer: None,
            channel_closed: false,
        }
    }

    /// Sends the flags we owe while the channel has room; they are best effort once the channel
    /// is gone.
    fn poll_owed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        while let Some(flag) = self.owed.front().copied() {
            if self.channel_closed {
                self.owed.clear();
                break;
            }
            match self.channel.poll_send_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) => {
                    self.owed.clear();
                    break;
                }
                Poll::Ready(Ok(())) => {
                    let _ = self.channel.send(&Frame::flag(flag).encode());
                    self.owed.pop_front();
                }
            }
        }
        Poll::Ready(())
    }

    /// Reads what the channel has into `data` and applies its flags; `Ready` when something
    /// changed, `Pending` once the channel has nothing more for now.
    fn poll_inbound(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.channel_closed {
            return Poll::Ready(Ok(()));
        }
        let message = match ready!(self.channel.poll_recv(cx)) {
            None => {
                self.channel_closed = true;
                // A channel closed without FIN ends the stream for both halves.
                if self.read == ReadState::Open {
                    self.read = ReadState::Finished;
                }
                if matches!(self.write, WriteState::Open | WriteState::FinSent) {
                    self.write = WriteState::Closed;
                }
                return Poll::Ready(Ok(()));
            }
            Some(Err(e)) => {
                self.reset_locally();
                return Poll::Ready(Err(e));
            }
            Some(Ok(message)) => message,
        };
        self.incoming.extend_from_slice(&message);
        loop {
            let body = match take_prefixed(&mut self.incoming, MAX_FRAME) {
                Ok(Some(body)) => body,
                Ok(None) => break,
                Err(e) => {
                    self.reset_locally();
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
                }
            };
            let frame = Frame::decode(&body).map_err(|e| {
                self.reset_locally();
                io::Error::new(io::ErrorKind::InvalidData, e)
            })?;
            if !frame.message.is_empty() && self.read == ReadState::Open {
                self.data.extend(frame.message);
            }
            match frame.flag {
                None => {}
                Some(Flag::Fin) => {
                    if self.read == ReadState::Open {
                        self.read = ReadState::Finished;
                    }
                    self.owed.push_back(Flag::FinAck);
                }
                Some(Flag::FinAck) if self.write == WriteState::FinSent => {
                    self.write = WriteState::Closed;
                }
                Some(Flag::FinAck) => {}
                Some(Flag::StopSending) => {
                    if matches!(self.write, WriteState::Open | WriteState::FinSent) {
                        self.write = WriteState::Stopped;
                    }
                }
                Some(Flag::ResetStream) => {
                    self.read = ReadState::Reset;
                    self.write = WriteState::Reset;
                    self.data.clear();
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Our side gives up on the stream: tell the remote and forget what was buffered.
    fn reset_locally(&mut self) {
        if !self.channel_closed && !matches!(self.write, WriteState::Reset) {
            let _ = self.channel.send(&Frame::flag(Flag::ResetStream).encode());
        }
        self.read = ReadState::Reset;
        self.write = WriteState::Reset;
        self.data.clear();
        self.channel.close();
        self.channel_closed = true;
    }

    /// Both halves done: the channel can go.
    fn close_channel_when_done(&mut self) {
        let read_done = self.read != ReadState::Open;
        let write_done = self.write != WriteState::Open && self.write != WriteState::FinSent;
        if read_done && write_done && self.owed.is_empty() && !self.channel_closed {
            self.channel.close();
            self.channel_closed = true;
        }
    }
}

impl<C: Channel> AsyncRead for Stream<C> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let _ = this.poll_owed(cx);
        loop {
            if !this.data.is_empty() {
                let n = buf.len().min(this.data.len());
                for (slot, byte) in buf.iter_mut().zip(this.data.drain(..n)) {
                    *slot = byte;
                }
                return Poll::Ready(Ok(n));
            }
            match this.read {
                ReadState::Reset => {
                    return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
                }
                ReadState::Finished => {
                    let _ = this.poll_owed(cx);
                    this.close_channel_when_done();
                    return Poll::Ready(Ok(0));
                }
                ReadState::Open => {}
            }
            ready!(this.poll_inbound(cx))?;
            let _ = this.poll_owed(cx);
        }
    }
}

impl<C: Channel> AsyncWrite for Stream<C> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_owed(cx));
        // Notice a STOP_SENDING or RESET that arrived while we only wrote (taking in data only
        // up to a bound while nobody reads).
        while this.data.len() < MAX_UNREAD {
            let Poll::Ready(result) = this.poll_inbound(cx) else {
                break;
            };
            result?;
            if this.channel_closed || this.read != ReadState::Open {
                break;
            }
        }
        match this.write {
            WriteState::Open => {}
            WriteState::Reset => return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into())),
            _ => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
        ready!(this.channel.poll_send_ready(cx))?;
        let n = buf.len().min(MAX_PAYLOAD);
        this.channel
            .send(&Frame::data(buf[..n].to_vec()).encode())?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_owed(cx));
        if this.channel_closed {
            return Poll::Ready(Ok(()));
        }
        this.channel.poll_flushed(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_owed(cx));
        if this.write == WriteState::Open {
            if this.channel_closed {
                this.write = WriteState::Closed;
            } else {
                ready!(this.channel.poll_send_ready(cx))?;
                this.channel.send(&Frame::flag(Flag::Fin).encode())?;
                this.write = WriteState::FinSent;
                this.fin_ack_timer = Some(Delay::new(FIN_ACK_TIMEOUT));
            }
        }
        while this.write == WriteState::FinSent {
            if let Some(timer) = this.fin_ack_timer.as_mut()
                && timer.poll_unpin(cx).is_ready()
            {
                tracing::debug!("no FIN_ACK within {FIN_ACK_TIMEOUT:?}: closing anyway");
                this.write = WriteState::Closed;
                break;
            }
            ready!(this.poll_inbound(cx))?;
            let _ = this.poll_owed(cx);
        }
        this.fin_ack_timer = None;
        if this.write == WriteState::Reset {
            return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
        }
        if !this.channel_closed {
            ready!(this.channel.poll_flushed(cx))?;
        }
        this.close_channel_when_done();
        Poll::Ready(Ok(()))
    }
}

impl<C: Channel> Drop for Stream<C> {
    fn drop(&mut self) {
        if self.channel_closed {
            return;
        }
        let graceful = self.read != ReadState::Open
            && matches!(self.write, WriteState::Closed | WriteState::Stopped);
        if !graceful {
            let _ = self.channel.send(&Frame::flag(Flag::ResetStream).encode());
        } else {
            for flag in self.owed.drain(..) {
                let _ = self.channel.send(&Frame::flag(flag).encode());
            }
        }
        self.channel.close();
    }
}

impl<C: Channel> std::fmt::Debug for Stream<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("read", &self.read)
            .field("write", &self.write)
            .field("buffered", &self.data.len())
            .finish_non_exhaustive()
    }
}

/// An in-memory pair of channels for tests: what one sends the other receives.
#[cfg(test)]
pub(crate) mod memory {
    use super::*;
    use futures::StreamExt;
    use futures::channel::mpsc;

    pub struct MemoryChannel {
        tx: Option<mpsc::Sender<Vec<u8>>>,
        rx: mpsc::Receiver<Vec<u8>>,
        pub sent: Vec<Vec<u8>>,
    }

    pub fn pair() -> (MemoryChannel, MemoryChannel) {
        let (a_tx, b_rx) = mpsc::channel(1024);
        let (b_tx, a_rx) = mpsc::channel(1024);
        let side = |tx, rx| MemoryChannel {
            tx: Some(tx),
            rx,
            sent: Vec::new(),
        };
        (side(a_tx, a_rx), side(b_tx, b_rx))
    }

    impl Channel for MemoryChannel {
        fn poll_send_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(match &self.tx {
                Some(_) => Ok(()),
                None => Err(io::ErrorKind::BrokenPipe.into()),
            })
        }
        fn send(&mut self, message: &[u8]) -> io::Result<()> {
            assert!(message.len() <= MAX_FRAME, "{} bytes", message.len());
            self.sent.push(message.to_vec());
            let tx = self.tx.as_mut().ok_or(io::ErrorKind::BrokenPipe)?;
            tx.try_send(message.to_vec())
                .map_err(|_| io::ErrorKind::BrokenPipe.into())
        }
        fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Vec<u8>>>> {
            self.rx.poll_next_unpin(cx).map(|m| m.map(Ok))
        }
        fn poll_flushed(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn close(&mut self) {
            self.tx = None;
            self.rx.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::memory::pair;
    use super::*;
    use futures::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn a_large_write_arrives_in_frames_of_at_most_16_kib_and_close_is_acknowledged() {
        futures::executor::block_on(async {
            let (a, b) = pair();
            let (mut a, mut b) = (Stream::new(a), Stream::new(b));
            let payload: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
            a.write_all(&payload).await.unwrap();
            let reader = async {
                let mut got = Vec::new();
                b.read_to_end(&mut got).await.unwrap();
                got
            };
            // The writer's close waits for the reader's FIN_ACK, which the reader sends when it
            // reads the FIN: run both at once.
            let (closed, got) = futures::join!(a.close(), reader);
            closed.unwrap();
            assert_eq!(got, payload);
            assert_eq!(a.write, WriteState::Closed, "FIN_ACK seen");
            let frames = &a.channel.sent;
            assert!(frames.len() >= 7, "{}", frames.len());
            assert_eq!(frames.last().unwrap(), &Frame::flag(Flag::Fin).encode());
            assert_eq!(b.channel.sent, vec![Frame::flag(Flag::FinAck).encode()]);
            // Half-close: b can still answer after a closed its side.
            b.write_all(b"reply").await.unwrap();
            let (closed, reply) = futures::join!(b.close(), async {
                let mut r = Vec::new();
                a.read_to_end(&mut r).await.unwrap();
                r
            });
            closed.unwrap();
            assert_eq!(reply, b"reply");
        });
    }

    #[test]
    fn dropping_an_unclosed_stream_resets_it_for_the_remote() {
        futures::executor::block_on(async {
            let (a, b) = pair();
            let (mut a, mut b) = (Stream::new(a), Stream::new(b));
            a.write_all(b"partial").await.unwrap();
            drop(a);
            let mut got = Vec::new();
            let err = b.read_to_end(&mut got).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        });
    }

    #[test]
    fn stop_sending_ends_the_remote_writer_and_garbage_resets_the_stream() {
        futures::executor::block_on(async {
            let (a, mut b) = pair();
            let mut a = Stream::new(a);
            b.send(&Frame::flag(Flag::StopSending).encode()).unwrap();
            let err = a.write_all(b"x").await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);

            let (c, mut d) = pair();
            let mut c = Stream::new(c);
            // An announced length over 16 KiB.
            d.send(&[0xff, 0xff, 0x7f]).unwrap();
            let err = c.read(&mut [0; 8]).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            assert_eq!(c.read, ReadState::Reset);
        });
    }

    #[test]
    fn a_frame_split_across_channel_messages_is_reassembled() {
        futures::executor::block_on(async {
            let (a, mut b) = pair();
            let mut a = Stream::new(a);
            let frame = Frame::data(b"hello".to_vec()).encode();
            b.send(&frame[..3]).unwrap();
            b.send(&frame[3..]).unwrap();
            b.send(&Frame::flag(Flag::Fin).encode()).unwrap();
            let mut got = Vec::new();
            a.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"hello");
            assert_eq!(a.channel.sent, vec![Frame::flag(Flag::FinAck).encode()]);
        });
    }
}
