// One ES module, `dist/interop.js`, that the test adds to a page.
import { defineConfig } from 'vite';

export default defineConfig({
  logLevel: 'warn',
  build: {
    outDir: 'dist',
    lib: { entry: 'main.js', formats: ['es'], fileName: () => 'interop.js' },
    minify: false,
  },
});
