import { clusterReader, type ClusterStatus, type Me, type Node, type Page, TASK_STATES } from "../api";
import { CapacityBars } from "../components/capacity";
import { Donut, StackedBar } from "../components/charts";
import { Badge, Empty, ErrorBox, Loading, PageHeader } from "../components/ui";
import { ago } from "../format";
import { useFetch, usePoll, useThrottled, useTick } from "../hooks";
import { useLive } from "../live";
import { StorageCard } from "./Storage";

const WORK_STATES = ["active", "building", "stopped", "paused", "migrating", "error"];
const TASK_COLORS: Record<string, string> = {
  pending: "var(--muted-fill)", running: "var(--info)", succeeded: "var(--ok)", failed: "var(--bad)", cancelled: "var(--warn)",
};

export function Dashboard({ user }: { user: Me }) {
  // Nodes are cluster-scoped: project members see the counts, not the inventory.
  const cluster = clusterReader(user);
  const status = useFetch<ClusterStatus>("cluster/status");
  const nodes = useFetch<Page<Node>>(cluster ? "nodes?limit=500" : null);
  const refresh = useThrottled(() => {
    status.reload();
    if (cluster) nodes.reload();
  }, 1000);
  useLive(["node", "task", "vm", "container"], refresh);
  // Heartbeats are not events: re-read now and then so "last heartbeat" stays true.
  usePoll(refresh, 15000);
  const now = useTick();

  const s = status.data;
  const list = nodes.data?.items ?? [];
  const taskTotal = s ? TASK_STATES.reduce((a, k) => a + (s.tasks[k] ?? 0), 0) : 0;

  return (
    <>
      <PageHeader title="Dashboard">{s && <span class="muted">Cairn {s.version}</span>}</PageHeader>
      <ErrorBox error={status.error} onRetry={status.reload} />
      {!s && status.loading && <Loading what="cluster status" />}
      {s && (
        <div class="cards">
          <section class="card" aria-labelledby="nodes-h">
            <h2 id="nodes-h">Nodes</h2>
            <div class="card-row">
              <Donut value={s.nodes.ready} total={s.nodes.total} label="ready"
                color={s.nodes.ready < s.nodes.total ? "var(--warn)" : "var(--ok)"} />
              <p class="big-stat" data-testid="nodes-ready">
                <b>{s.nodes.ready}</b> of <b>{s.nodes.total}</b> {s.nodes.total === 1 ? "node" : "nodes"} ready
                {s.nodes.total - s.nodes.ready > 0 && <><br /><Badge value={`${s.nodes.total - s.nodes.ready} NotReady`} tone="bad" /></>}
              </p>
            </div>
          </section>
          <section class="card" aria-labelledby="tasks-h">
            <h2 id="tasks-h">Tasks</h2>
            <dl class="stat-grid">
              {TASK_STATES.map((k) => (
                <div key={k}><dt><a href={`/tasks?state=${k}`}>{k}</a></dt><dd>{s.tasks[k] ?? 0}</dd></div>
              ))}
            </dl>
            {taskTotal > 0 ? (
              <StackedBar label="Tasks by state"
                segments={TASK_STATES.filter((k) => s.tasks[k]).map((k) => ({ label: k, value: s.tasks[k], color: TASK_COLORS[k] }))} />
            ) : <Empty>No tasks yet.</Empty>}
          </section>
          {s.instances && (
            <section class="card" aria-labelledby="work-h" data-testid="workloads">
              <h2 id="work-h">Workloads</h2>
              <dl class="stat-grid two">
                {(["vm", "container"] as const).map((k) => {
                  const c = s.instances![k] ?? { total: 0 };
                  const path = k === "vm" ? "vms" : "containers";
                  return (
                    <div key={k}>
                      <dt><a href={`/${path}`}>{k === "vm" ? "VMs" : "Containers"}</a></dt>
                      <dd>{c.total ?? 0}</dd>
                      <dd class="small muted">
                        {WORK_STATES.filter((st) => c[st]).map((st, i) => (
                          <span key={st}>{i > 0 && ", "}<a href={`/${path}?state=${st}`}>{c[st]} {st}</a></span>
                        ))}
                      </dd>
                    </div>
                  );
                })}
              </dl>
            </section>
          )}
          <StorageCard />
          {cluster && <>
          <section class="card wide" aria-labelledby="cap-h">
            <h2 id="cap-h">Capacity</h2>
            {list.length === 0 ? <Empty>No node has reported its inventory yet.</Empty> : <CapacityBars nodes={list} />}
          </section>
          <section class="card wide" aria-labelledby="health-h">
            <h2 id="health-h">Node health</h2>
            <ErrorBox error={nodes.error} onRetry={nodes.reload} />
            {list.length === 0 && !nodes.loading && <Empty>No nodes have joined. Start <code>cairn-agent</code> on a node.</Empty>}
            <ul class="node-tiles">
              {list.map((n) => (
                <li key={n.id}>
                  <a href={`/nodes/${encodeURIComponent(n.name)}`} class={`node-tile node-${n.status.phase}`}>
                    <b>{n.name}</b>
                    <Badge value={n.status.phase ?? "Unknown"} />
                    <small>heartbeat {ago(n.status.last_heartbeat, now)}</small>
                  </a>
                </li>
              ))}
            </ul>
          </section>
          </>}
        </div>
      )}
    </>
  );
}
