/**
 * A VM's screen in noVNC over a websocket (RFB in binary frames, subprotocol "binary").
 * noVNC is loaded on first use, so the rest of the console stays small.
 */

import { useEffect, useRef, useState } from "preact/hooks";
import type RFB from "@novnc/novnc";
import { asError, postForFile, type ApiError } from "../api";
import { ErrorBox } from "../components/ui";
import { socketUrl } from "../instances";
import { ctrlAltF, SYSRQ_KEYS, sysrq, typing, type Stroke } from "./keys";
import { PasteDialog } from "./PasteDialog";

type State = "loading" | "connecting" | "connected" | "closed" | "refused";

const STATE_TEXT: Record<State, string> = {
  loading: "Loading the viewer…",
  connecting: "Connecting…",
  connected: "Connected",
  closed: "Disconnected",
  refused: "Refused",
};

/** Downloads the answer of POST `path` as a file (a .vv for remote-viewer). */
async function download(path: string, fallback: string): Promise<void> {
  const res = await postForFile(path);
  const name = /filename="([^"]+)"/.exec(res.headers.get("content-disposition") ?? "")?.[1] ?? fallback;
  const url = URL.createObjectURL(await res.blob());
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

export function VncConsole({ socket, label, vv }: {
  socket: string;
  label: string;
  vv?: string; // POST path of the .vv file for remote-viewer
}) {
  const screen = useRef<HTMLDivElement>(null);
  const rfb = useRef<RFB | null>(null);
  const [state, setState] = useState<State>("loading");
  const [reason, setReason] = useState("");
  const [desktop, setDesktop] = useState("");
  const [attempt, setAttempt] = useState(0);
  const [pasting, setPasting] = useState(false);
  const [vvError, setVvError] = useState<ApiError | null>(null);

  useEffect(() => {
    let disposed = false;
    (async () => {
      const { default: Rfb } = await import("@novnc/novnc");
      if (disposed || !screen.current) return;
      setState("connecting");
      let connected = false;
      const r = new Rfb(screen.current, socketUrl(socket), { wsProtocols: ["binary"], shared: true });
      r.scaleViewport = true;
      r.background = "#0d1117";
      r.addEventListener("connect", () => {
        connected = true;
        setState("connected");
        setReason("");
      });
      r.addEventListener("desktopname", (e) => setDesktop((e as CustomEvent<{ name: string }>).detail.name));
      r.addEventListener("securityfailure", (e) => {
        setReason((e as CustomEvent<{ reason?: string }>).detail.reason || "VNC security negotiation failed");
      });
      r.addEventListener("disconnect", (e) => {
        if (disposed) return;
        rfb.current = null;
        const clean = (e as CustomEvent<{ clean: boolean }>).detail.clean;
        if (!connected) {
          setState("refused");
          setReason((old) => old || "the console needs the operator role in the project, and the VM running on a node this API reaches");
        } else {
          setState("closed");
          setReason(clean ? "" : "the connection was lost");
        }
      });
      rfb.current = r;
    })().catch((e) => {
      if (disposed) return;
      setState("closed");
      setReason(String(e));
    });
    return () => {
      disposed = true;
      rfb.current?.disconnect();
      rfb.current = null;
    };
  }, [socket, attempt]);

  const live = state === "connected";
  const send = (strokes: Stroke[]) => {
    for (const [p, down] of strokes) rfb.current?.sendKey(p.keysym, p.code, down);
    rfb.current?.focus();
  };
  return (
    <section class="console" aria-label={label}>
      <div class="console-bar">
        <span class={`console-state console-${state}`} aria-live="polite" data-testid="console-state">
          <i aria-hidden="true" />{STATE_TEXT[state]}{live && desktop && <> to <b>{desktop}</b></>}
          {reason && !live && <>: {reason}</>}
        </span>
        {(state === "closed" || state === "refused") && (
          <button type="button" class="small" onClick={() => setAttempt((a) => a + 1)}>Reconnect</button>
        )}
        <div class="keys" role="group" aria-label="Special keys">
          <button type="button" class="small" disabled={!live} onClick={() => { rfb.current?.sendCtrlAltDel(); rfb.current?.focus(); }}>Ctrl-Alt-Del</button>
          <select class="small" aria-label="Send Ctrl-Alt-F key" disabled={!live} value=""
            onChange={(e) => { const n = Number((e.target as HTMLSelectElement).value); if (n) send(ctrlAltF(n)); }}>
            <option value="">Ctrl-Alt-F…</option>
            {Array.from({ length: 12 }, (_, i) => <option key={i} value={i + 1}>Ctrl-Alt-F{i + 1}</option>)}
          </select>
          <select class="small" aria-label="Send SysRq key" disabled={!live} value=""
            onChange={(e) => { const k = (e.target as HTMLSelectElement).value; if (k) send(sysrq(k)); }}>
            <option value="">SysRq…</option>
            {SYSRQ_KEYS.map(([k, what]) => <option key={k} value={k}>Alt-SysRq-{k.toUpperCase()}: {what}</option>)}
          </select>
          <button type="button" class="small" disabled={!live} onClick={() => setPasting(true)}>Paste…</button>
        </div>
        {vv && (
          <button type="button" class="small" title="A one-time ticket for remote-viewer (virt-viewer), valid for a minute"
            onClick={() => { setVvError(null); download(vv, "console.vv").catch((e) => setVvError(asError(e))); }}>Download .vv</button>
        )}
        <button type="button" class="small" disabled={!live} onClick={() => screen.current?.requestFullscreen?.()}>Full screen</button>
      </div>
      <ErrorBox error={vvError} />
      <div class="vnc-screen" ref={screen} data-testid="vnc-screen" />
      {pasting && (
        <PasteDialog title="Type text into the VM" onClose={() => setPasting(false)}
          hint="Typed as key presses on a US keyboard layout (the guest's layout decides what it shows)."
          onSend={(text) => {
            const { strokes, skipped } = typing(text);
            send(strokes);
            return skipped.length ? `Typed all but ${skipped.length} character(s) no US key makes: ${[...new Set(skipped)].join(" ")}` : null;
          }} />
      )}
    </section>
  );
}
