// The package loads its .wasm with `new URL(..., import.meta.url)`, which Vite's dependency
// pre-bundling would break in `vite dev`; `vite build` emits it as an asset. The training
// worker is an ES module (it awaits `init()` at the top level).
export default {
  optimizeDeps: { exclude: ['swarmtrain'] },
  build: { target: 'es2022' },
  worker: { format: 'es' },
};
