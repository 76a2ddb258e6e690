// The tab's identity seed in IndexedDB (database "swarmtrain", store "identity", key "seed":
// 32 bytes), created on first use. A seed left in localStorage by an older version of the
// package is moved here and removed from localStorage.
const DB = 'swarmtrain';
const STORE = 'identity';
const KEY = 'seed';
const LEGACY = 'swarmtrain.identity.v1';

function open() {
  return new Promise((resolve, reject) => {
    const req = indexedDB.open(DB, 1);
    req.onupgradeneeded = () => req.result.createObjectStore(STORE);
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

function run(db, mode, op) {
  return new Promise((resolve, reject) => {
    const tx = db.transaction(STORE, mode);
    const req = op(tx.objectStore(STORE));
    tx.oncomplete = () => resolve(req.result);
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error ?? new Error('IndexedDB transaction aborted'));
  });
}

function fromHex(hex) {
  const clean = (hex ?? '').trim();
  if (!/^[0-9a-fA-F]{64}$/.test(clean)) return null;
  return Uint8Array.from(clean.match(/../g), (b) => parseInt(b, 16));
}

export async function loadSeed() {
  const db = await open();
  try {
    const stored = await run(db, 'readonly', (s) => s.get(KEY));
    if (stored instanceof Uint8Array && stored.length === 32) return stored;
    const legacy = fromHex(globalThis.localStorage?.getItem(LEGACY));
    const seed = legacy ?? crypto.getRandomValues(new Uint8Array(32));
    await run(db, 'readwrite', (s) => s.put(seed, KEY));
    globalThis.localStorage?.removeItem(LEGACY);
    return seed;
  } finally {
    db.close();
  }
}

export async function storeSeed(seed) {
  const db = await open();
  try {
    await run(db, 'readwrite', (s) => s.put(Uint8Array.from(seed), KEY));
  } finally {
    db.close();
  }
}
