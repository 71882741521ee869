import { defineConfig } from "vite";

// The API serves dist/ at / (and index.html for client routes), so assets use absolute paths.
// `npm run dev` proxies /api to a running appliance (default https://127.0.0.1:8443):
//   CAIRN_API=http://127.0.0.1:8080 npm run dev
export default defineConfig({
  base: "/",
  build: { outDir: "dist", emptyOutDir: true, target: "es2022", sourcemap: false },
  server: {
    // secure: false accepts the appliance's self-signed certificate.
    proxy: { "/api": { target: process.env.CAIRN_API ?? "https://127.0.0.1:8443", changeOrigin: false, secure: false } },
  },
});
