// A js-libp2p node in the page, as a js-libp2p user would configure one for browser-to-browser
// WebRTC: WebSocket to the relay, a circuit relay v2 reservation, WebRTC listening and
// dialing, noise, yamux, identify and ping. The interop test drives it through `window.js`.
import { createLibp2p } from 'libp2p';
import { webSockets } from '@libp2p/websockets';
import { webRTC } from '@libp2p/webrtc';
import { circuitRelayTransport } from '@libp2p/circuit-relay-v2';
import { noise } from '@chainsafe/libp2p-noise';
import { yamux } from '@chainsafe/libp2p-yamux';
import { identify } from '@libp2p/identify';
import { ping } from '@libp2p/ping';
import { multiaddr } from '@multiformats/multiaddr';

let node;

window.js = {
  // Connects to the relay at `relayAddr` (its WebSocket multiaddr with /p2p/<relay>) and holds
  // a reservation there, listening for WebRTC.
  async start(relayAddr) {
    node = await createLibp2p({
      addresses: { listen: [`${relayAddr}/p2p-circuit`, '/webrtc'] },
      transports: [webSockets(), webRTC(), circuitRelayTransport()],
      connectionEncrypters: [noise()],
      streamMuxers: [yamux()],
      // The test runs on loopback, which browsers' js-libp2p refuses to dial by default.
      connectionGater: { denyDialMultiaddr: async () => false },
      services: { identify: identify(), ping: ping() },
    });
    return node.peerId.toString();
  },
  addresses: () => node.getMultiaddrs().map((a) => a.toString()),
  connections: () => node.getConnections().map((c) => ({
    peer: c.remotePeer.toString(), addr: c.remoteAddr.toString(), limited: c.limits != null,
  })),
  async dial(addr) {
    const c = await node.dial(multiaddr(addr));
    return c.remoteAddr.toString();
  },
  // Pings `addr` (a connection to it is opened if needed) and returns the round trip in ms.
  ping: (addr) => node.services.ping.ping(multiaddr(addr)),
  // The agent version `peer` sent in identify (a stream exchange in each direction).
  async agent(peer) {
    const connection = node.getConnections().find((c) => c.remotePeer.toString() === peer);
    if (!connection) return null;
    const agent = (await node.peerStore.get(connection.remotePeer)).metadata.get('AgentVersion');
    return agent ? new TextDecoder().decode(agent) : null;
  },
};
