/** Data hooks: fetch with loading/error state, lists that stay current through live events. */

import { useCallback, useEffect, useRef, useState } from "preact/hooks";
import { ApiError, asError, get, qs, type Page, type Task } from "./api";
import { useLive, type ChangeEvent } from "./live";

export interface Loaded<T> {
  data: T | null;
  error: ApiError | null;
  loading: boolean;
  reload: () => void;
}

export function useFetch<T>(path: string | null): Loaded<T> {
  const [data, setData] = useState<T | null>(null);
  const [error, setError] = useState<ApiError | null>(null);
  const [loading, setLoading] = useState(true);
  const generation = useRef(0);
  const load = useCallback(() => {
    if (!path) {
      setLoading(false);
      return;
    }
    const mine = ++generation.current;
    setLoading(true);
    get<T>(path)
      .then((d) => {
        if (mine !== generation.current) return;
        setData(d);
        setError(null);
      })
      .catch((e) => mine === generation.current && setError(asError(e)))
      .finally(() => mine === generation.current && setLoading(false));
  }, [path]);
  useEffect(load, [load]);
  return { data, error, loading, reload: load };
}

/** Calls `fn` at most once per `ms` however often it is poked (event bursts). */
export function useThrottled(fn: () => void, ms = 500): () => void {
  const timer = useRef<number | null>(null);
  const latest = useRef(fn);
  latest.current = fn;
  useEffect(() => () => {
    if (timer.current !== null) clearTimeout(timer.current);
  }, []);
  return useCallback(() => {
    if (timer.current !== null) return;
    timer.current = window.setTimeout(() => {
      timer.current = null;
      latest.current();
    }, ms);
  }, [ms]);
}

/** Event verbs that say the resource itself changed (others tell of something that happened to it). */
const RESOURCE_VERBS = new Set(["created", "updated", "deleted"]);

export interface LiveList<T> {
  items: T[];
  error: ApiError | null;
  loading: boolean;
  more: boolean;
  loadMore: () => void;
  reload: () => void;
}

/**
 * A paginated list (`{items, next_cursor}`) kept current by events of `kind`:
 * updates replace the row in place, creations go on top, deletions drop the row.
 */
export function useLiveList<T extends { id: string }>(
  path: string,
  kind: string,
  params: Record<string, string | number | null | undefined> = {},
  accept: (item: T) => boolean = () => true,
): LiveList<T> {
  const [items, setItems] = useState<T[]>([]);
  const [cursor, setCursor] = useState<string | null>(null);
  const [error, setError] = useState<ApiError | null>(null);
  const [loading, setLoading] = useState(true);
  const key = path + qs(params);
  const generation = useRef(0);

  const fetchPage = useCallback((after: string | null) => {
    const mine = ++generation.current;
    if (!path) {
      setLoading(false);
      return;
    }
    setLoading(true);
    get<Page<T>>(path + qs({ limit: 100, ...params, cursor: after }))
      .then((page) => {
        if (mine !== generation.current) return;
        setItems((old) => (after ? [...old, ...page.items.filter((i) => !old.some((o) => o.id === i.id))] : page.items));
        setCursor(page.next_cursor);
        setError(null);
      })
      .catch((e) => mine === generation.current && setError(asError(e)))
      .finally(() => mine === generation.current && setLoading(false));
  }, [key]);

  useEffect(() => fetchPage(null), [fetchPage]);

  const acceptRef = useRef(accept);
  acceptRef.current = accept;
  useLive([kind], (e: ChangeEvent) => {
    const obj = e.object as unknown as T;
    // an event that tells of something other than a change of the resource carries the
    // resource too; one that does not (an older server's) must not replace a row
    if (!RESOURCE_VERBS.has(e.verb) && !(obj && typeof obj === "object" && "status" in obj)) return;
    setItems((old) => {
      const at = old.findIndex((o) => o.id === e.id);
      if (e.verb === "deleted" || !acceptRef.current(obj)) return at < 0 ? old : old.filter((o) => o.id !== e.id);
      if (at >= 0) {
        const copy = old.slice();
        copy[at] = obj;
        return copy;
      }
      return [obj, ...old];
    });
  });

  return {
    items,
    error,
    loading,
    more: cursor !== null,
    loadMore: () => fetchPage(cursor),
    reload: () => fetchPage(null),
  };
}

/** Re-renders every `ms` so relative times ("5 s ago") stay true. */
export function useTick(ms = 5000): number {
  const [now, setNow] = useState(Date.now());
  useEffect(() => {
    const t = setInterval(() => setNow(Date.now()), ms);
    return () => clearInterval(t);
  }, [ms]);
  return now;
}

/** Calls `fn` every `ms` while the page is visible. */
export function usePoll(fn: () => void, ms: number): void {
  const latest = useRef(fn);
  latest.current = fn;
  useEffect(() => {
    const t = setInterval(() => {
      if (document.visibilityState === "visible") latest.current();
    }, ms);
    return () => clearInterval(t);
  }, [ms]);
}

const STATE_RANK: Record<string, number> = { pending: 0, running: 1, succeeded: 2, failed: 2, cancelled: 2 };

/** Whichever copy of one task is further along (events and HTTP answers may arrive in any order). */
export function laterTask(a: Task | undefined, b: Task): Task {
  if (!a || a.id !== b.id) return b;
  const ra = STATE_RANK[a.state] ?? 0;
  const rb = STATE_RANK[b.state] ?? 0;
  if (ra !== rb) return rb > ra ? b : a;
  return (b.progress?.percent ?? 0) >= (a.progress?.percent ?? 0) ? b : a;
}

export const taskActive = (t: Task | undefined): boolean => !!t && (t.state === "pending" || t.state === "running");

export interface ResourceTasks {
  /** The newest task seen for each resource id (running ones from the start, then every one the events show). */
  byResource: Map<string, Task>;
  /** Follow a task this page just started (the 202 answer of a POST). */
  track: (task: Task) => void;
}

const recent = (t: Task): boolean => !t.finished_at || Date.now() - Date.parse(t.finished_at) < 60_000;

// Tasks this console started, by resource id: the page navigated to next (a new VM's detail)
// shows the task's progress even when it ended before that page could load the running ones.
const started = new Map<string, Task>();

/** Tasks acting on resources of `kind` ("vm", "container"), kept current by task events. */
export function useResourceTasks(kind: string): ResourceTasks {
  const [byResource, setByResource] = useState<Map<string, Task>>(
    () => new Map([...started].filter(([, t]) => t.resource?.kind === kind && recent(t))),
  );
  const put = useCallback((task: Task) => {
    const rid = task.resource?.id;
    if (!rid || task.resource?.kind !== kind) return;
    if (started.get(rid)?.id === task.id) started.set(rid, laterTask(started.get(rid), task));
    setByResource((old) => {
      const current = old.get(rid);
      // An older task's late event must not replace the newer one.
      if (current && current.id !== task.id && (current.created_at ?? "") > (task.created_at ?? "")) return old;
      const next = laterTask(current, task);
      if (next === current) return old;
      const copy = new Map(old);
      copy.set(rid, next);
      return copy;
    });
  }, [kind]);

  useEffect(() => {
    for (const state of ["pending", "running"]) {
      get<Page<Task>>(`tasks${qs({ state, limit: 100 })}`).then((page) => page.items.forEach(put)).catch(() => {});
    }
  }, [put]);
  useLive(["task"], (e) => put(e.object as unknown as Task));

  const track = useCallback((task: Task) => {
    if (task.resource?.id) started.set(task.resource.id, task);
    put(task);
    // The event stream may already have passed the task's first updates.
    get<Task>(`tasks/${task.id}`).then(put).catch(() => {});
  }, [put]);
  return { byResource, track };
}

export interface ActionState {
  busy: boolean;
  error: ApiError | null;
  setError: (e: ApiError | null) => void;
  /** Runs `fn` with busy set; its error (an ApiError) goes to `error`; resolves with its value, or undefined. */
  run: <T>(fn: () => Promise<T>) => Promise<T | undefined>;
}

/** One button's (or dialog's) write: busy while it runs, the API's refusal shown where it was asked. */
export function useAction(): ActionState {
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<ApiError | null>(null);
  const run = useCallback(async <T,>(fn: () => Promise<T>): Promise<T | undefined> => {
    setBusy(true);
    setError(null);
    try {
      return await fn();
    } catch (e) {
      setError(asError(e));
      return undefined;
    } finally {
      setBusy(false);
    }
  }, []);
  return { busy, error, setError, run };
}
