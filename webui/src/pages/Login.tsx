import { useEffect, useState } from "preact/hooks";
import { ApiError, login, type Me } from "../api";

export function Login({ onLoggedIn, notice }: { onLoggedIn: (user: Me) => void; notice?: string }) {
  const [username, setUsername] = useState("admin");
  const [password, setPassword] = useState("");
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  useEffect(() => {
    document.title = "Sign in · Cairn";
  }, []);

  async function submit(ev: Event) {
    ev.preventDefault();
    setBusy(true);
    setError(null);
    try {
      onLoggedIn(await login(username.trim(), password));
    } catch (e) {
      setError(e instanceof ApiError ? e.message : String(e));
      setPassword("");
    } finally {
      setBusy(false);
    }
  }

  return (
    <main class="login" id="main">
      <form class="login-card" onSubmit={submit} aria-labelledby="login-title">
        <div class="brand brand-large"><img src="/favicon.svg" alt="" width="36" height="36" /> Cairn</div>
        <h1 id="login-title">Sign in</h1>
        {notice && !error && <p class="notice">{notice}</p>}
        {error && <div class="error-box" role="alert"><strong>Sign-in failed</strong><span>{error}</span></div>}
        <label>
          User name
          <input name="username" autoComplete="username" required value={username}
            onInput={(e) => setUsername((e.target as HTMLInputElement).value)} />
        </label>
        <label>
          Password
          <input name="password" type="password" autoComplete="current-password" required autoFocus value={password}
            onInput={(e) => setPassword((e.target as HTMLInputElement).value)} />
        </label>
        <button type="submit" class="primary" disabled={busy}>{busy ? "Signing in…" : "Sign in"}</button>
        <p class="hint">The first admin's password is in <code>secrets/admin-password</code> under the appliance's data directory.</p>
      </form>
    </main>
  );
}
