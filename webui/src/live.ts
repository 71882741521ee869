/** Live updates: one EventSource on /api/v1/events shared by every page. */

import { useEffect, useRef, useState } from "preact/hooks";
import { API } from "./api";

export interface ChangeEvent<T = Record<string, unknown>> {
  seq: number;
  kind: string;
  verb: "created" | "updated" | "deleted" | string;
  id: string;
  name: string;
  project: string | null;
  time?: string;
  object: T;
}

export type LiveState = "connecting" | "live" | "reconnecting" | "closed";
type Listener = (e: ChangeEvent) => void;

// The server names each message after its kind (`event: node`), and EventSource only
// delivers named events to listeners registered for that name.
const KINDS = [
  "node", "task", "project", "user", "token", "member", "image", "vm", "container", "instance",
  "network", "subnet", "port", "security-group", "placement-group", "volume", "snapshot",
  "storage-pool", "router", "floating-ip", "cluster",
];
const RECENT_MAX = 200;

let source: EventSource | null = null;
let state: LiveState = "closed";
const listeners = new Set<Listener>();
const stateListeners = new Set<(s: LiveState) => void>();
/** The newest events seen since the console opened, newest first. */
export const recent: ChangeEvent[] = [];

function setState(s: LiveState): void {
  state = s;
  stateListeners.forEach((fn) => fn(s));
}

function deliver(msg: MessageEvent): void {
  let event: ChangeEvent;
  try {
    event = JSON.parse(msg.data);
  } catch {
    return;
  }
  recent.unshift(event);
  if (recent.length > RECENT_MAX) recent.length = RECENT_MAX;
  listeners.forEach((fn) => fn(event));
}

/** Open the stream (after login). The browser resumes with Last-Event-ID by itself. */
export function connect(onClosed: () => void): void {
  if (source) return;
  setState("connecting");
  source = new EventSource(`${API}/events`, { withCredentials: true });
  source.onopen = () => setState("live");
  source.onmessage = deliver;
  for (const kind of KINDS) source.addEventListener(kind, deliver as EventListener);
  source.onerror = () => {
    if (source?.readyState === EventSource.CLOSED) {
      // A refused reconnect (e.g. 401 after the session expired): the browser gives up.
      disconnect();
      onClosed();
    } else {
      setState("reconnecting");
    }
  };
}

export function disconnect(): void {
  source?.close();
  source = null;
  recent.length = 0;
  setState("closed");
}

export function subscribe(fn: Listener): () => void {
  listeners.add(fn);
  return () => listeners.delete(fn);
}

/** Calls `fn` for every change of the given kinds while the component is mounted. */
export function useLive(kinds: string[], fn: Listener): void {
  const key = kinds.join(",");
  const latest = useRef(fn);
  latest.current = fn;
  useEffect(() => {
    const wanted = key.split(",");
    return subscribe((e) => {
      if (wanted.includes(e.kind)) latest.current(e);
    });
  }, [key]);
}

export function useLiveState(): LiveState {
  const [s, set] = useState(state);
  useEffect(() => {
    stateListeners.add(set);
    set(state);
    return () => {
      stateListeners.delete(set);
    };
  }, []);
  return s;
}
