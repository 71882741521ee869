/**
 * A text console in xterm.js over a websocket: a VM's serial port or a container's TTY.
 * The server sends bytes (binary frames) and takes keystrokes as text frames; it knows
 * no terminal size, so the remote side keeps its own (usually 80x24) whatever we show.
 * xterm.js is loaded on first use, so the rest of the console stays small.
 */

import { useEffect, useRef, useState } from "preact/hooks";
import type { Terminal } from "@xterm/xterm";
import type { SearchAddon } from "@xterm/addon-search";
import { ApiError, getText } from "../api";
import { socketUrl } from "../instances";
import { PasteDialog } from "./PasteDialog";

/** Control characters a browser may keep for itself (Ctrl-W closes the tab…). */
const CONTROL_KEYS: [string, string][] = [
  ["\x03", "Ctrl-C (interrupt)"], ["\x04", "Ctrl-D (end of input)"], ["\x1a", "Ctrl-Z (suspend)"],
  ["\x1c", "Ctrl-\\ (quit)"], ["\x0c", "Ctrl-L (redraw)"], ["\x17", "Ctrl-W"], ["\x1b", "Esc"],
];

type State = "loading" | "connecting" | "connected" | "closed" | "refused";

const STATE_TEXT: Record<State, string> = {
  loading: "Loading the terminal…",
  connecting: "Connecting…",
  connected: "Connected",
  closed: "Disconnected",
  refused: "Refused",
};

/** Reads a CSS variable of the page so the terminal follows the light / dark theme. */
function cssVar(name: string, fallback: string): string {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim() || fallback;
}

export function TerminalConsole({ socket, history, label }: {
  socket: string; // "vms/web/console/serial?project=default"
  history?: string; // "vms/web/console-log?project=default": what was printed before we connected
  label: string; // "Serial console of VM web"
}) {
  const host = useRef<HTMLDivElement>(null);
  const term = useRef<Terminal | null>(null);
  const search = useRef<SearchAddon | null>(null);
  const [find, setFind] = useState("");
  const [found, setFound] = useState<boolean | null>(null);
  const [state, setState] = useState<State>("loading");
  const [reason, setReason] = useState("");
  const [attempt, setAttempt] = useState(0);
  const [pasting, setPasting] = useState(false);

  useEffect(() => {
    let disposed = false;
    let ws: WebSocket | null = null;
    let observer: ResizeObserver | null = null;

    (async () => {
      const [{ Terminal }, { FitAddon }, { SearchAddon }] = await Promise.all([
        import("@xterm/xterm"), import("@xterm/addon-fit"), import("@xterm/addon-search"), import("@xterm/xterm/css/xterm.css"),
      ]);
      if (disposed || !host.current) return;
      const t = new Terminal({
        cursorBlink: true,
        fontFamily: 'ui-monospace, "DejaVu Sans Mono", monospace',
        fontSize: 14,
        scrollback: 5000,
        theme: { background: "#0d1117", foreground: "#e6edf3", cursor: cssVar("--accent", "#4f95c8") },
      });
      const fit = new FitAddon();
      t.loadAddon(fit);
      const finder = new SearchAddon();
      t.loadAddon(finder);
      search.current = finder;
      t.open(host.current);
      fit.fit();
      term.current = t;
      observer = new ResizeObserver(() => fit.fit());
      observer.observe(host.current);

      setState("connecting");
      const encoder = new TextEncoder();
      const pending: Uint8Array[] = [];
      let replayed = !history;
      ws = new WebSocket(socketUrl(socket));
      ws.binaryType = "arraybuffer";
      let opened = false;
      ws.onopen = () => {
        opened = true;
        setState("connected");
        t.focus();
      };
      ws.onmessage = (m) => {
        const data = typeof m.data === "string" ? encoder.encode(m.data) : new Uint8Array(m.data as ArrayBuffer);
        if (replayed) t.write(data);
        else pending.push(data); // after the history, so nothing is shown out of order
      };
      ws.onclose = (e) => {
        if (disposed) return;
        if (!opened) {
          // The server refuses before the handshake (403): the browser hides its reason.
          setState("refused");
          setReason("the console needs the operator role in the project, and the instance running on a node this API reaches");
        } else {
          setState("closed");
          setReason(e.reason || (e.wasClean ? "" : "the connection was lost"));
        }
      };
      t.onData((d) => ws?.readyState === WebSocket.OPEN && ws.send(d));
      t.onBinary((d) => {
        if (ws?.readyState !== WebSocket.OPEN) return;
        ws.send(Uint8Array.from(d, (c) => c.charCodeAt(0) & 0xff));
      });

      if (history) {
        // What was printed before we connected (the boot messages), then what came since.
        try {
          const text = await getText(history);
          if (disposed) return;
          if (text) t.write(text.replace(/\r?\n/g, "\r\n"));
        } catch (e) {
          if (!(e instanceof ApiError)) throw e; // no log yet: live output only
        }
        replayed = true;
        pending.splice(0).forEach((d) => t.write(d));
      }
    })().catch((e) => {
      if (disposed) return;
      setState("closed");
      setReason(String(e));
    });

    return () => {
      disposed = true;
      observer?.disconnect();
      ws?.close();
      term.current?.dispose();
      term.current = null;
      search.current = null;
    };
  }, [socket, history, attempt]);

  /** Enter looks further back (the newest match first, as in a log), Shift+Enter forward. */
  function onFindKey(e: KeyboardEvent) {
    if (e.key !== "Enter" || !find) return;
    e.preventDefault();
    const s = search.current;
    if (!s) return;
    setFound(e.shiftKey ? s.findNext(find) : s.findPrevious(find));
  }

  const live = state === "connected";
  return (
    <section class="console" aria-label={label}>
      <div class="console-bar">
        <span class={`console-state console-${state}`} aria-live="polite" data-testid="console-state">
          <i aria-hidden="true" />{STATE_TEXT[state]}{reason && !live && <>: {reason}</>}
        </span>
        {(state === "closed" || state === "refused") && (
          <button type="button" class="small" onClick={() => setAttempt((a) => a + 1)}>Reconnect</button>
        )}
        <input type="search" class="find" placeholder="Find… (Enter)" aria-label="Find in the console" value={find}
          aria-invalid={found === false} title={found === false ? "not found" : "Enter: further back, Shift+Enter: forward"}
          onInput={(e) => { setFind((e.target as HTMLInputElement).value); setFound(null); }} onKeyDown={onFindKey} />
        {found === false && <span class="muted small" aria-live="polite">not found</span>}
        <div class="keys" role="group" aria-label="Special keys">
          <select class="small" aria-label="Send a control key" disabled={!live} value=""
            onChange={(e) => { const k = (e.target as HTMLSelectElement).value; if (k) { term.current?.input(k); term.current?.focus(); } }}>
            <option value="">Keys…</option>
            {CONTROL_KEYS.map(([k, what]) => <option key={what} value={k}>{what}</option>)}
          </select>
          <button type="button" class="small" disabled={!live} onClick={() => setPasting(true)}>Paste…</button>
        </div>
        <button type="button" class="small" disabled={!live} onClick={() => { term.current?.clear(); term.current?.focus(); }}>Clear</button>
      </div>
      <div class="terminal" ref={host} data-testid="terminal" />
      {pasting && (
        <PasteDialog title="Paste into the console" onClose={() => { setPasting(false); term.current?.focus(); }}
          hint="Sent as if typed (line breaks as Enter). Ctrl-Shift-V pastes straight into the terminal too."
          onSend={(text) => { term.current?.paste(text); return null; }} />
      )}
    </section>
  );
}
