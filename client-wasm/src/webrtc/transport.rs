//! Browser-to-browser WebRTC as a libp2p `Transport`. It dials
//! `<relay address>/p2p/<relay>/p2p-circuit/webrtc/p2p/<peer>` and listens on
//! `<relay address>/p2p/<relay>/p2p-circuit/webrtc` (next to a circuit relay reservation on the
//! same relay, which the relay client transport holds). The signaling streams come from the
//! [`signaling`](super::signaling) behaviour; the handshake runs as a task of the page
//! ([`handshake`](super::handshake)).

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use futures::channel::{mpsc, oneshot};
use futures::future::{BoxFuture, Ready};
use futures::{FutureExt, SinkExt, StreamExt};
use libp2p::PeerId;
use libp2p::core::transport::{DialOpts, ListenerId, TransportError, TransportEvent};
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::multiaddr::Protocol;
use wasm_bindgen_futures::spawn_local;

use super::IceServer;
use super::connection::Connection;
use super::handshake::{self, HANDSHAKE_TIMEOUT};
use super::signaling::{self, Request, Signaling, is_listen_addr, parse_dial};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("WebRTC handshake with {peer}: {reason}")]
    Handshake { peer: PeerId, reason: String },
    #[error("the signaling behaviour is gone")]
    Gone,
    #[error("too many WebRTC dials at once")]
    Busy,
}

type Dials = Arc<Mutex<HashMap<u64, (PeerId, oneshot::Sender<Result<Connection, Error>>)>>>;

struct Accepted {
    peer: PeerId,
    connection: Connection,
    send_back: Multiaddr,
}

pub struct Transport {
    ice: Arc<Vec<IceServer>>,
    requests: mpsc::Sender<Request>,
    signaling: mpsc::Receiver<Signaling>,
    dials: Dials,
    next_id: u64,
    listener: Option<(ListenerId, Multiaddr)>,
    accepted_tx: mpsc::Sender<Accepted>,
    accepted: mpsc::Receiver<Accepted>,
    events: VecDeque<TransportEvent<<Self as libp2p::core::Transport>::ListenerUpgrade, Error>>,
    waker: Option<Waker>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("listener", &self.listener)
            .field("ice_servers", &self.ice.len())
            .finish_non_exhaustive()
    }
}

/// Dials, signaling streams and accepted connections waiting between the transport and the
/// behaviour; beyond it a dial is refused and an inbound signaling stream dropped.
const QUEUE: usize = 32;

/// The transport and the behaviour that feeds it, for a node that uses `ice` servers.
pub fn new(ice: Vec<IceServer>) -> (Transport, signaling::Behaviour) {
    let (requests, requests_rx) = mpsc::channel(QUEUE);
    let (signaling_tx, signaling) = mpsc::channel(QUEUE);
    let (accepted_tx, accepted) = mpsc::channel(QUEUE);
    (
        Transport {
            ice: Arc::new(ice),
            requests,
            signaling,
            dials: Arc::default(),
            next_id: 0,
            listener: None,
            accepted_tx,
            accepted,
            events: VecDeque::new(),
            waker: None,
        },
        signaling::Behaviour::new(requests_rx, signaling_tx),
    )
}

impl Transport {
    fn on_signaling(&mut self, signaling: Signaling) {
        match signaling {
            Signaling::Failed { id, error } => {
                if let Some((peer, reply)) = self.dials.lock().expect("dials").remove(&id) {
                    let _ = reply.send(Err(Error::Handshake {
                        peer,
                        reason: error,
                    }));
                }
            }
            Signaling::Outbound { id, stream } => {
                let dials = self.dials.clone();
                let ice = self.ice.clone();
                spawn_local(async move {
                    let result = handshake::dial(stream, &ice).await;
                    let dial = dials.lock().expect("dials").remove(&id);
                    if let (Ok(connection), Some((peer, _))) = (&result, &dial) {
                        record(*peer, connection).await;
                    }
                    if let Some((peer, reply)) = dial {
                        let _ =
                            reply.send(result.map_err(|reason| Error::Handshake { peer, reason }));
                    }
                });
            }
            Signaling::Inbound {
                peer,
                relayed,
                stream,
            } => {
                let ice = self.ice.clone();
                let mut accepted = self.accepted_tx.clone();
                spawn_local(async move {
                    match handshake::answer(stream, &ice).await {
                        Ok(connection) => {
                            record(peer, &connection).await;
                            let send_back =
                                relayed.with(Protocol::WebRTC).with(Protocol::P2p(peer));
                            let _ = accepted
                                .send(Accepted {
                                    peer,
                                    connection,
                                    send_back,
                                })
                                .await;
                        }
                        Err(e) => tracing::info!(%peer, "inbound WebRTC handshake failed: {e}"),
                    }
                });
            }
        }
    }
}

/// Records which candidate pair the new link to `peer` uses, and logs it.
async fn record(peer: PeerId, connection: &Connection) {
    match handshake::selected_path(connection.peer_connection()).await {
        Some(path) => {
            tracing::info!(
                %peer,
                local = %path.local, remote = %path.remote,
                local_address = %path.local_address, remote_address = %path.remote_address,
                "direct WebRTC link up"
            );
            super::record_path(peer, path);
        }
        None => {
            tracing::info!(%peer, "direct WebRTC link up; no selected candidate pair in its stats")
        }
    }
}

impl libp2p::core::Transport for Transport {
    type Output = (PeerId, Connection);
    type Error = Error;
    type ListenerUpgrade = Ready<Result<Self::Output, Error>>;
    type Dial = BoxFuture<'static, Result<Self::Output, Error>>;

    fn listen_on(&mut self, id: ListenerId, addr: Multiaddr) -> Result<(), TransportError<Error>> {
        if !is_listen_addr(&addr) || self.listener.is_some() {
            return Err(TransportError::MultiaddrNotSupported(addr));
        }
        if self.requests.try_send(Request::Listen(true)).is_err() {
            return Err(TransportError::Other(Error::Busy));
        }
        self.events.push_back(TransportEvent::NewAddress {
            listener_id: id,
            listen_addr: addr.clone(),
        });
        self.listener = Some((id, addr));
        if let Some(w) = self.waker.take() {
            w.wake();
        }
        Ok(())
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        if self.listener.as_ref().is_some_and(|(l, _)| *l == id) {
            self.listener = None;
            let _ = self.requests.try_send(Request::Listen(false));
            self.events.push_back(TransportEvent::ListenerClosed {
                listener_id: id,
                reason: Ok(()),
            });
            return true;
        }
        false
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        opts: DialOpts,
    ) -> Result<Self::Dial, TransportError<Error>> {
        let Some((relayed, peer)) = parse_dial(&addr) else {
            return Err(TransportError::MultiaddrNotSupported(addr));
        };
        if opts.role != Endpoint::Dialer {
            return Err(TransportError::MultiaddrNotSupported(addr));
        }
        let id = self.next_id;
        self.next_id += 1;
        let (reply, answer) = oneshot::channel();
        self.dials.lock().expect("dials").insert(id, (peer, reply));
        if self
            .requests
            .try_send(Request::Dial { id, peer, relayed })
            .is_err()
        {
            self.dials.lock().expect("dials").remove(&id);
            return Err(TransportError::Other(Error::Busy));
        }
        let dials = self.dials.clone();
        Ok(async move {
            let timeout = futures_timer::Delay::new(HANDSHAKE_TIMEOUT * 2);
            futures::select! {
                result = answer.fuse() => result.map_err(|_| Error::Gone)?.map(|c| (peer, c)),
                _ = timeout.fuse() => {
                    dials.lock().expect("dials").remove(&id);
                    Err(Error::Handshake { peer, reason: "timed out".into() })
                }
            }
        }
        .boxed())
    }

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Error>> {
        let this = &mut *self;
        while let Poll::Ready(Some(signaling)) = this.signaling.poll_next_unpin(cx) {
            this.on_signaling(signaling);
        }
        while let Poll::Ready(Some(accepted)) = this.accepted.poll_next_unpin(cx) {
            let Some((listener_id, local_addr)) = this.listener.clone() else {
                continue; // stopped listening meanwhile: the connection closes on drop
            };
            this.events.push_back(TransportEvent::Incoming {
                listener_id,
                upgrade: futures::future::ready(Ok((accepted.peer, accepted.connection))),
                local_addr,
                send_back_addr: accepted.send_back,
            });
        }
        if let Some(event) = this.events.pop_front() {
            return Poll::Ready(event);
        }
        this.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}
