import { defineConfig } from "vite";

// The API serves dist/ at / (and index.html for client routes), so assets use absolute paths.
// `npm run dev` proxies /api to a running appliance: CAIRN_API=http://127.0.0.1:8080 npm run dev
export default defineConfig({
  base: "/",
  build: { outDir: "dist", emptyOutDir: true, target: "es2022", sourcemap: false },
  server: {
    proxy: { "/api": { target: process.env.CAIRN_API ?? "http://127.0.0.1:8080", changeOrigin: false } },
  },
});
