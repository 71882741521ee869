/** The cluster: members and their roles, quorum, the database primary, Ceph's health, node
 * maintenance (drain / undrain with the drain task's progress) and a timeline of failovers. */

import { useState } from "preact/hooks";
import {
  canOperate, offers, post, type ClusterView, type Me, type Node, type Page, type Task,
} from "../api";
import { Progress } from "../components/charts";
import { Confirm } from "../components/dialog";
import { Badge, Empty, ErrorBox, Loading, PageHeader } from "../components/ui";
import { ago, when } from "../format";
import { taskActive, useAction, useFetch, useLiveList, usePoll, useResourceTasks, useThrottled, useTick } from "../hooks";
import { recent, useLive, type ChangeEvent } from "../live";

const HEALTH_TONE: Record<string, string> = { HEALTH_OK: "ok", HEALTH_WARN: "warn", HEALTH_ERR: "bad", NONE: "muted" };
const PHASE_TONE: Record<string, string> = { Ready: "ok", NotReady: "bad", Fenced: "bad", Maintenance: "warn" };
const ROLE_TONE: Record<string, string> = {
  "etcd-leader": "info", "database-primary": "info", "redis-master": "info", "ceph-mgr-active": "info",
};

export function NodePhase({ node }: { node: Node }) {
  const phase = node.status.phase ?? "Unknown";
  return <Badge value={phase} tone={PHASE_TONE[phase] ?? "muted"} />;
}

/** Drain / undrain buttons of one node (for cluster operators, when the API has them), and the drain task's progress. */
export function Maintenance({ node, user, compact = false }: { node: Node; user: Me; compact?: boolean }) {
  const tasks = useResourceTasks("node");
  const action = useAction();
  const [asking, setAsking] = useState(false);
  const task = tasks.byResource.get(node.id);
  const draining = task?.name === "node.drain" ? task : undefined;
  const inMaintenance = node.status.phase === "Maintenance" || !!(node.spec as { maintenance?: boolean }).maintenance;
  const path = `nodes/${encodeURIComponent(node.name)}`;
  if (!canOperate(user) || !offers("POST /api/v1/nodes/{name}/drain")) return null;
  return (
    <div class={compact ? "maintenance compact" : "maintenance"}>
      {inMaintenance ? (
        <button type="button" class="small" disabled={action.busy || taskActive(draining)}
          onClick={() => action.run(() => post(`${path}/undrain`))}>Undrain</button>
      ) : (
        <button type="button" class="small" disabled={action.busy || node.status.phase !== "Ready"}
          title={node.status.phase !== "Ready" ? `only a Ready node can be drained (it is ${node.status.phase})` : ""}
          onClick={() => setAsking(true)}>Drain…</button>
      )}
      {draining && (taskActive(draining) || Date.now() - Date.parse(draining.finished_at ?? "") < 60_000) && (
        <div class="row-progress" aria-live="polite">
          <Progress percent={draining.state === "succeeded" ? 100 : draining.progress?.percent ?? 0} state={draining.state}
            label={`Drain of ${node.name}`} />
          <small class={draining.error ? "error-text" : "muted"}>{draining.error ?? draining.progress?.message}</small>
        </div>
      )}
      <ErrorBox error={action.error} />
      {asking && (
        <Confirm title={`Drain node ${node.name}?`} confirm="Drain" busy={action.busy} onClose={() => setAsking(false)}
          onConfirm={async () => {
            setAsking(false);
            const t = await action.run(() => post<Task>(`${path}/drain`));
            if (t) tasks.track(t);
          }}>
          <p>Its VMs live-migrate and its containers restart on other nodes; then it takes no new work until it is undrained.
            Refused, with nothing changed, when the other nodes lack the room.</p>
        </Confirm>
      )}
    </div>
  );
}

interface Moment { at: string; kind: "bad" | "warn" | "ok" | "info"; what: string; detail?: string }

/** What happened around failovers, oldest first: nodes lost and fenced (their status keeps
 * the times), failover tasks (created, finished), nodes back (unfenced), and what the event
 * stream showed since the console opened. */
export function timeline(nodes: Node[], failovers: Task[], events: ChangeEvent[]): Moment[] {
  const out: Moment[] = [];
  for (const n of nodes) {
    const ha = (n.status.ha ?? {}) as { lost_at?: string; fenced_at?: string };
    if (ha.lost_at) out.push({ at: ha.lost_at, kind: "bad", what: `node ${n.name} lost`, detail: "its cluster lease expired" });
    if (ha.fenced_at) out.push({ at: ha.fenced_at, kind: "warn", what: `node ${n.name} fenced`, detail: "its storage was cut off before its HA instances restart elsewhere" });
  }
  for (const t of failovers) {
    const target = `${t.resource?.kind ?? "instance"} ${t.resource?.name ?? "?"}`;
    if (t.created_at) out.push({ at: t.created_at, kind: "info", what: `failover of ${target} started`, detail: t.progress?.message });
    if (t.finished_at) {
      out.push({ at: t.finished_at, kind: t.state === "succeeded" ? "ok" : "bad", what: `failover of ${target} ${t.state}`,
        detail: t.error ?? (t.result ? Object.entries(t.result).map(([k, v]) => `${k}: ${String(v)}`).join(", ") : undefined) });
    }
  }
  const seen = new Set(out.map((m) => `${m.what}@${m.at.slice(0, 19)}`));
  for (const e of events) {
    if (e.kind !== "node" || !["fenced", "lost", "unfenced"].includes(e.verb) || !e.time) continue;
    const m: Moment = { at: e.time, kind: e.verb === "unfenced" ? "ok" : e.verb === "lost" ? "bad" : "warn",
      what: `node ${e.name} ${e.verb}`, detail: (e.object as { reason?: string }).reason };
    if (!seen.has(`${m.what}@${m.at.slice(0, 19)}`)) out.push(m);
  }
  return out.sort((a, b) => Date.parse(a.at) - Date.parse(b.at));
}

export function Cluster({ user }: { user: Me }) {
  const view = useFetch<ClusterView>("cluster");
  const nodes = useLiveList<Node>("nodes", "node");
  const failovers = useFetch<Page<Task>>("tasks?name=instance.failover&limit=50");
  const [events, setEvents] = useState<ChangeEvent[]>(() => recent.slice());
  const refresh = useThrottled(() => { view.reload(); failovers.reload(); }, 2000);
  useLive(["node", "cluster"], () => { setEvents(recent.slice()); refresh(); });
  useLive(["task"], (e) => { if (e.name === "instance.failover") failovers.reload(); });
  usePoll(view.reload, 15000);
  // while a node is down or fenced a failover may be under way: its tasks are fetched again
  // every few seconds too, so the timeline never waits on one missed event
  const unsettled = nodes.items.some((n) => !["Ready", "Maintenance"].includes(n.status.phase ?? ""));
  usePoll(() => { if (unsettled) failovers.reload(); }, 3000);
  const now = useTick();
  const v = view.data;
  const byName = new Map(nodes.items.map((n) => [n.name, n]));
  const moments = timeline(nodes.items, failovers.data?.items ?? [], events);
  return (
    <>
      <PageHeader title="Cluster">{v && <span class="muted">{v.mode === "embedded" ? "single node" : String(v.name ?? "")}</span>}</PageHeader>
      <ErrorBox error={view.error} onRetry={view.reload} />
      {!v && view.loading && <Loading what="the cluster" />}
      {v && (
        <div class="cards">
          <section class="card" aria-labelledby="health-h">
            <h2 id="health-h">Health</h2>
            <dl class="kv" data-testid="cluster-health">
              <div><dt>Quorum</dt><dd><Badge value={v.quorum ? "yes" : "lost"} tone={v.quorum ? "ok" : "bad"} /></dd></div>
              <div><dt>Database primary</dt><dd>{v.database.primary ?? <Badge value="none" tone="bad" />}
                {v.database.kind ? <span class="muted"> ({String(v.database.kind)})</span> : null}</dd></div>
              <div><dt>Ceph</dt><dd><Badge value={String(v.ceph.health ?? "unknown")} tone={HEALTH_TONE[String(v.ceph.health)] ?? "muted"} />
                {Array.isArray(v.ceph.checks) && v.ceph.checks.length > 0 && <span class="muted small"> {v.ceph.checks.join("; ")}</span>}</dd></div>
              {typeof v.redis === "object" && v.redis && <div><dt>Broker master</dt><dd>{String((v.redis as { master?: string }).master ?? "—")}</dd></div>}
              {/* the live node list's phase where there is one: the view is fetched less often */}
              <div><dt>Members</dt><dd>{v.members.filter((m) => {
                const live = byName.get(m.name)?.status.phase;
                return live ? live === "Ready" : m.ready;
              }).length} of {v.members.length} ready</dd></div>
            </dl>
          </section>
        </div>
      )}
      {v && (
        <section class="section" aria-labelledby="members-h">
          <h2 id="members-h">Members</h2>
          <table class="table">
            <thead><tr><th>Name</th><th>Address</th><th>Phase</th><th>Roles</th><th>Heartbeat</th><th>Maintenance</th></tr></thead>
            <tbody>{v.members.map((m) => {
              const n = byName.get(m.name);
              return (
                <tr key={m.name}>
                  <td>{n ? <a href={`/nodes/${encodeURIComponent(m.name)}`}><b>{m.name}</b></a> : <b>{m.name}</b>}</td>
                  <td class="mono">{m.address}</td>
                  <td>{n ? <NodePhase node={n} /> : <Badge value={m.ready ? "Ready" : "NotReady"} />}</td>
                  <td>{m.roles.map((r) => <Badge key={r} value={r} tone={ROLE_TONE[r] ?? "muted"} />)}</td>
                  <td>{n ? ago(n.status.last_heartbeat, now) : "—"}</td>
                  <td>{n && <Maintenance node={n} user={user} compact />}</td>
                </tr>
              );
            })}</tbody>
          </table>
        </section>
      )}
      <section class="section" aria-labelledby="timeline-h">
        <h2 id="timeline-h">Failovers</h2>
        {moments.length === 0 ? <Empty>No node was lost and no instance failed over.</Empty> : (
          <ol class="timeline" data-testid="failover-timeline">
            {moments.map((m, i) => (
              <li key={i} class={`moment moment-${m.kind}`}>
                <time dateTime={m.at} title={when(m.at)}>{new Date(m.at).toLocaleTimeString()}</time>
                <b>{m.what}</b>{m.detail && <span class="muted"> — {m.detail}</span>}
              </li>
            ))}
          </ol>
        )}
      </section>
    </>
  );
}
