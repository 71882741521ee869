/**
 * A VM's screen in noVNC over a websocket (RFB in binary frames, subprotocol "binary").
 * noVNC is loaded on first use, so the rest of the console stays small.
 */

import { useEffect, useRef, useState } from "preact/hooks";
import type RFB from "@novnc/novnc";
import { socketUrl } from "../instances";

type State = "loading" | "connecting" | "connected" | "closed" | "refused";

const STATE_TEXT: Record<State, string> = {
  loading: "Loading the viewer…",
  connecting: "Connecting…",
  connected: "Connected",
  closed: "Disconnected",
  refused: "Refused",
};

export function VncConsole({ socket, label }: { socket: string; label: string }) {
  const screen = useRef<HTMLDivElement>(null);
  const rfb = useRef<RFB | null>(null);
  const [state, setState] = useState<State>("loading");
  const [reason, setReason] = useState("");
  const [desktop, setDesktop] = useState("");
  const [attempt, setAttempt] = useState(0);

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
        <button type="button" class="small" disabled={!live} onClick={() => rfb.current?.sendCtrlAltDel()}>Send Ctrl+Alt+Del</button>
        <button type="button" class="small" disabled={!live} onClick={() => screen.current?.requestFullscreen?.()}>Full screen</button>
      </div>
      <div class="vnc-screen" ref={screen} data-testid="vnc-screen" />
    </section>
  );
}
