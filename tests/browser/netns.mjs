// A simulated internet inside this machine, from Linux network namespaces (`ip netns`, run as
// root): a "public" segment (the namespace `inet` holds its bridge) with the relay's host on
// it, and home networks, each behind a NAT router namespace that masquerades its LAN onto the
// public segment with iptables. A cone NAT keeps a LAN socket's port for every destination
// (Linux's default masquerade: endpoint-independent mapping, port-restricted filtering); a
// symmetric NAT (`--random-fully`) gives every new destination a new random port, which STUN
// cannot predict, so only TURN gets through.
//
// Nothing here reaches outside: no namespace has a link to the machine's own network, and the
// only addresses used are those of the namespaces made here (the public segment is
// 203.0.113.0/24, TEST-NET-3; homes are 10.77.N.0/24). Everything is torn down by `down()`,
// which the tests call in `finally` and on exit.
import { execFileSync, spawn } from 'node:child_process';

export const PUBLIC_NET = '203.0.113';
export const RELAY_IP = `${PUBLIC_NET}.10`;

function ip(args) {
  return execFileSync('ip', args, { stdio: ['ignore', 'pipe', 'pipe'] }).toString();
}

/// Whether this process may build namespaces (root with `ip netns`, iptables, coturn).
export function available() {
  try {
    if (process.getuid?.() !== 0) return 'not root';
    execFileSync('iptables', ['--version'], { stdio: 'ignore' });
    execFileSync('turnserver', ['--version'], { stdio: 'ignore' });
    ip(['netns', 'list']);
    return null;
  } catch (e) {
    return String(e.message ?? e).split('\n')[0];
  }
}

export class Internet {
  // `homes`: [{ name: 'a', nat: 'cone' | 'symmetric' }]; the relay's host is `relay`.
  constructor(homes) {
    this.tag = `st${process.pid % 100000}`;
    this.homes = homes.map((h, i) => ({ ...h, lan: `10.77.${i + 1}`, wan: `${PUBLIC_NET}.${21 + i}` }));
    this.namespaces = [];
    this.children = [];
  }

  ns(name) {
    return `${this.tag}-${name}`;
  }

  // `cmd` run inside namespace `name` (synchronously).
  exec(name, cmd, args) {
    return execFileSync('ip', ['netns', 'exec', this.ns(name), cmd, ...args], { stdio: ['ignore', 'pipe', 'pipe'] }).toString();
  }

  // A long-running process inside namespace `name`, killed by `down()`.
  spawn(name, cmd, args, options = {}) {
    const child = spawn('ip', ['netns', 'exec', this.ns(name), cmd, ...args], options);
    this.children.push(child);
    return child;
  }

  // The path of an executable that runs `program` inside namespace `name` (for playwright's
  // `executablePath`): `ip netns exec` keeps the file descriptors Chromium's pipe uses.
  wrapper(name, program, dir, writeFile, chmod) {
    const path = `${dir}/${name}-${program.split('/').at(-1)}`;
    writeFile(path, `#!/bin/sh\nexec ip netns exec ${this.ns(name)} ${program} "$@"\n`);
    chmod(path, 0o755);
    return path;
  }

  addNs(name) {
    ip(['netns', 'add', this.ns(name)]);
    this.namespaces.push(name);
    ip(['-n', this.ns(name), 'link', 'set', 'lo', 'up']);
  }

  // A veth pair from `a`'s interface `ifA` to `b`'s `ifB`.
  link(a, ifA, b, ifB) {
    ip(['link', 'add', ifA, 'netns', this.ns(a), 'type', 'veth', 'peer', 'name', ifB, 'netns', this.ns(b)]);
    ip(['-n', this.ns(a), 'link', 'set', ifA, 'up']);
    ip(['-n', this.ns(b), 'link', 'set', ifB, 'up']);
  }

  // Plugs `name`'s interface `ifname` into the public segment with `address`.
  plug(name, ifname, address) {
    const port = `p-${name}`.slice(0, 15);
    this.link(name, ifname, 'inet', port);
    ip(['-n', this.ns('inet'), 'link', 'set', port, 'master', 'br0']);
    ip(['-n', this.ns(name), 'addr', 'add', `${address}/24`, 'dev', ifname]);
  }

  up() {
    try {
      this.addNs('inet');
      ip(['-n', this.ns('inet'), 'link', 'add', 'br0', 'type', 'bridge']);
      ip(['-n', this.ns('inet'), 'link', 'set', 'br0', 'up']);
      this.addNs('relay');
      this.plug('relay', 'eth0', RELAY_IP);
      for (const home of this.homes) {
        const router = `nat-${home.name}`;
        const host = `home-${home.name}`;
        this.addNs(router);
        this.addNs(host);
        this.plug(router, 'wan', home.wan);
        this.link(host, 'eth0', router, 'lan');
        ip(['-n', this.ns(router), 'addr', 'add', `${home.lan}.1/24`, 'dev', 'lan']);
        ip(['-n', this.ns(host), 'addr', 'add', `${home.lan}.2/24`, 'dev', 'eth0']);
        ip(['-n', this.ns(host), 'route', 'add', 'default', 'via', `${home.lan}.1`]);
        this.exec(router, 'sysctl', ['-qw', 'net.ipv4.ip_forward=1']);
        this.exec(router, 'iptables', ['-t', 'nat', '-A', 'POSTROUTING', '-o', 'wan', '-j', 'MASQUERADE',
          ...(home.nat === 'symmetric' ? ['--random-fully'] : [])]);
        // A home router's firewall: unsolicited packets from the internet are dropped. Besides
        // being what routers do, this keeps conntrack from recording them: a recorded one
        // would hold the 5-tuple that the LAN's own answer needs, and the NAT would then map
        // that answer to another port (the NAT would turn symmetric for that peer).
        this.exec(router, 'iptables', ['-A', 'INPUT', '-i', 'wan', '-m', 'conntrack', '--ctstate', 'NEW', '-j', 'DROP']);
        home.host = host;
      }
    } catch (e) {
      this.down();
      throw e;
    }
    return this;
  }

  down() {
    for (const child of this.children) {
      try { child.kill('SIGKILL'); } catch { /* gone */ }
    }
    this.children = [];
    for (const name of this.namespaces.reverse()) {
      try { ip(['netns', 'del', this.ns(name)]); } catch { /* gone */ }
    }
    this.namespaces = [];
  }
}

// Namespaces an earlier run of this file left behind (killed before its `finally`): removed
// before a new run builds its own.
export function sweep() {
  for (const line of ip(['netns', 'list']).split('\n')) {
    const name = line.split(' ')[0];
    if (/^st\d+-/.test(name)) {
      try {
        for (const pid of ip(['netns', 'pids', name]).split('\n').filter(Boolean)) process.kill(Number(pid), 'SIGKILL');
      } catch { /* gone */ }
      try { ip(['netns', 'del', name]); } catch { /* gone */ }
    }
  }
}
