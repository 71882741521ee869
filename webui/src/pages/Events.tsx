import { useEffect, useState } from "preact/hooks";
import { Badge, Empty, PageHeader } from "../components/ui";
import { when } from "../format";
import { recent, subscribe, useLiveState, type ChangeEvent } from "../live";

function objectState(e: ChangeEvent): string | null {
  const o = e.object as Record<string, any>;
  return o?.state ?? o?.status?.phase ?? o?.status?.vm_state ?? o?.status?.state ?? null;
}

function link(e: ChangeEvent): string | null {
  if (e.kind === "node") return `/nodes/${encodeURIComponent(e.name)}`;
  if (e.kind === "task") return "/tasks";
  return null;
}

export function Events() {
  const [events, setEvents] = useState<ChangeEvent[]>(() => recent.slice());
  const [kind, setKind] = useState("");
  const live = useLiveState();
  useEffect(() => subscribe(() => setEvents(recent.slice())), []);
  const kinds = Array.from(new Set(events.map((e) => e.kind))).sort();
  const shown = kind ? events.filter((e) => e.kind === kind) : events;

  return (
    <>
      <PageHeader title="Events">
        <label class="inline">
          Kind{" "}
          <select value={kind} onChange={(e) => setKind((e.target as HTMLSelectElement).value)}>
            <option value="">all</option>
            {kinds.map((k) => <option key={k} value={k}>{k}</option>)}
          </select>
        </label>
      </PageHeader>
      <p class="muted">Every change in the cluster, as it happens ({live === "live" ? "stream connected" : `stream ${live}`}); the newest 200 since this console was opened.</p>
      {shown.length === 0 ? <Empty>No changes since this console was opened. Node joins and phase changes, task progress and every create, update or delete appear here as they happen.</Empty> : (
        <ol class="feed" aria-live="polite" aria-relevant="additions">
          {shown.map((e) => {
            const st = objectState(e);
            const href = link(e);
            return (
              <li key={e.seq} class={`feed-item verb-${e.verb}`}>
                <span class="feed-seq mono">#{e.seq}</span>
                <span class="feed-kind">{e.kind}</span>
                <span class="feed-name">{href ? <a href={href}>{e.name || e.id}</a> : (e.name || e.id)}</span>
                <Badge value={e.verb} />
                {st && <Badge value={st} />}
                {e.project && <span class="muted">project {e.project}</span>}
                <time class="muted feed-time" dateTime={e.time}>{when(e.time)}</time>
              </li>
            );
          })}
        </ol>
      )}
    </>
  );
}
