// A PostgreSQL server of the test's own for the relays' shared ledger (`--ledger-url`):
// Debian's, which `cargo xtask test` installs and names in SWARMTRAIN_POSTGRES_BIN, in a
// temporary directory on loopback, run as the `postgres` user when the tests run as root
// (PostgreSQL refuses root). `stop()` stops it and deletes its directory.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

function binDir() {
  if (process.env.SWARMTRAIN_POSTGRES_BIN) return process.env.SWARMTRAIN_POSTGRES_BIN;
  const found = existsSync('/usr/lib/postgresql')
    ? readdirSync('/usr/lib/postgresql').map((v) => join('/usr/lib/postgresql', v, 'bin')).filter((b) => existsSync(join(b, 'pg_ctl'))).sort()
    : [];
  if (!found.length) throw new Error('PostgreSQL is not installed: `cargo xtask test` installs it and sets SWARMTRAIN_POSTGRES_BIN');
  return found.at(-1);
}

const freePort = () => new Promise((resolve, reject) => {
  const server = createServer();
  server.on('error', reject);
  server.listen(0, '127.0.0.1', () => {
    const { port } = server.address();
    server.close(() => resolve(port));
  });
});

export async function startPostgres() {
  const bin = binDir();
  const dir = mkdtempSync(join(tmpdir(), 'swarmtrain-postgres-'));
  const data = join(dir, 'data');
  const asRoot = process.getuid?.() === 0;
  const run = (program, args) => {
    const done = asRoot
      ? spawnSync('runuser', ['-u', 'postgres', '--', join(bin, program), ...args], { encoding: 'utf8' })
      : spawnSync(join(bin, program), args, { encoding: 'utf8' });
    if (done.status !== 0) throw new Error(`${program} failed: ${done.stderr}`);
  };
  if (asRoot) {
    const chown = spawnSync('chown', ['-R', 'postgres:postgres', dir]);
    if (chown.status !== 0) throw new Error('chown the PostgreSQL directory');
  }
  const port = await freePort();
  run('initdb', ['--auth=trust', '--username=postgres', '--no-sync', '-D', data]);
  run('pg_ctl', ['-w', '-t', '60', '-o', `-p ${port} -k ${dir} -c listen_addresses=127.0.0.1 -c fsync=off`,
    '-l', join(dir, 'log'), '-D', data, 'start']);
  return {
    url: `postgres://postgres@127.0.0.1:${port}/postgres`,
    stop() {
      try {
        run('pg_ctl', ['-w', '-m', 'immediate', '-D', data, 'stop']);
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    },
  };
}
