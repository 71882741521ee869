/** Shared building blocks: page header, error box, badges, empty states. */

import type { ComponentChildren } from "preact";
import { useEffect } from "preact/hooks";
import type { ApiError, Condition } from "../api";

export function PageHeader({ title, children }: { title: string; children?: ComponentChildren }) {
  useEffect(() => {
    document.title = `${title} · Cairn`;
  }, [title]);
  return (
    <header class="page-header">
      <h1>{title}</h1>
      {children && <div class="page-actions">{children}</div>}
    </header>
  );
}

/** The API's problem+json `detail`, shown where the failed thing would have been. */
export function ErrorBox({ error, onRetry }: { error: ApiError | Error | string | null; onRetry?: () => void }) {
  if (!error) return null;
  const text = typeof error === "string" ? error : error.message;
  const status = typeof error === "object" && "status" in error ? error.status : 0;
  const title = typeof error === "object" && "title" in error && status ? `${status} ${error.title}` : "Error";
  // Retrying only helps when the API was unreachable or failed, not when it said no.
  const transient = status === 0 || status >= 500;
  return (
    <div class="error-box" role="alert">
      <strong>{title}</strong>
      <span>{text}</span>
      {onRetry && transient && <button type="button" class="link-button" onClick={onRetry}>Retry</button>}
    </div>
  );
}

const TONE: Record<string, string> = {
  Ready: "ok", succeeded: "ok", True: "ok", active: "ok", running: "info", Running: "info",
  pending: "muted", building: "info", NotReady: "bad", failed: "bad", error: "bad", False: "bad",
  cancelled: "muted", stopped: "muted", created: "ok", updated: "info", deleted: "bad",
};

export function Badge({ value, tone }: { value: string; tone?: string }) {
  return <span class={`badge badge-${tone ?? TONE[value] ?? "muted"}`}>{value}</span>;
}

export function Empty({ children }: { children: ComponentChildren }) {
  return <p class="empty">{children}</p>;
}

export function Loading({ what }: { what: string }) {
  return <p class="loading" aria-live="polite">Loading {what}…</p>;
}

export function Conditions({ conditions }: { conditions: Condition[] }) {
  if (!conditions?.length) return null;
  return (
    <table class="table compact">
      <caption>Conditions</caption>
      <thead><tr><th>Type</th><th>Status</th><th>Reason</th><th>Message</th><th>Since</th></tr></thead>
      <tbody>
        {conditions.map((c) => (
          <tr key={c.type}>
            <td>{c.type}</td><td><Badge value={c.status} /></td><td>{c.reason}</td><td>{c.message}</td>
            <td>{c.last_transition_time ? new Date(c.last_transition_time).toLocaleString() : "—"}</td>
          </tr>
        ))}
      </tbody>
    </table>
  );
}
