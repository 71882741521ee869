import { useState } from "preact/hooks";
import { ApiError, canOperate, get, offers, post, type Me, type Node, type Task } from "../api";
import { CapacityBars, capacityOf } from "../components/capacity";
import { MiniBar, Progress } from "../components/charts";
import { History } from "../components/history";
import { Badge, Conditions, Empty, ErrorBox, Loading, PageHeader } from "../components/ui";
import { ago, bytes, resultLabel, resultValue, speed, when } from "../format";
import { useFetch, useLiveList, usePoll, useTick } from "../hooks";
import { useLive } from "../live";
import { Maintenance, NodePhase } from "./Cluster";

function cpuSummary(n: Node): string {
  const inv = n.status.inventory;
  if (!inv) return "—";
  return `${inv.cores ?? "?"} cores / ${inv.threads ?? "?"} threads`;
}

export function Nodes({ user }: { user: Me }) {
  const nodes = useLiveList<Node>("nodes", "node");
  usePoll(nodes.reload, 15000); // heartbeats are not events
  const now = useTick();
  return (
    <>
      <PageHeader title="Nodes" />
      <ErrorBox error={nodes.error} onRetry={nodes.reload} />
      {nodes.loading && nodes.items.length === 0 && <Loading what="nodes" />}
      {!nodes.loading && !nodes.error && nodes.items.length === 0 && (
        <Empty>No nodes have joined the cluster yet.</Empty>
      )}
      {nodes.items.length > 0 && (
        <table class="table">
          <thead>
            <tr><th>Name</th><th>Phase</th><th>CPU</th><th>Memory</th><th>vCPUs claimed</th><th>Memory claimed</th><th>Disks</th><th>Virt</th><th>Last heartbeat</th>
              {canOperate(user) && offers("POST /api/v1/nodes/{name}/drain") && <th>Maintenance</th>}</tr>
          </thead>
          <tbody>
            {nodes.items.map((n) => {
              const inv = n.status.inventory ?? {};
              const c = capacityOf([n]);
              return (
                <tr key={n.id}>
                  <td><a href={`/nodes/${encodeURIComponent(n.name)}`}><b>{n.name}</b></a>
                    {n.spec.schedulable === false && <> <Badge value="cordoned" tone="warn" /></>}</td>
                  <td><NodePhase node={n} /></td>
                  <td>{cpuSummary(n)}</td>
                  <td>{bytes(inv.memory_bytes)}</td>
                  <td><MiniBar label="vCPUs claimed" used={c.vcpusClaimed} total={c.vcpus}
                    text={`${c.vcpusClaimed} / ${c.vcpus}`} /></td>
                  <td><MiniBar label="Memory claimed" used={c.memoryClaimed} total={c.memoryAllocatable}
                    text={`${bytes(c.memoryClaimed)} / ${bytes(c.memoryAllocatable)}`} /></td>
                  <td>{inv.disks?.length ?? 0}</td>
                  <td>{inv.virt_type ?? "—"}</td>
                  <td title={when(n.status.last_heartbeat)}>{ago(n.status.last_heartbeat, now)}</td>
                  {canOperate(user) && offers("POST /api/v1/nodes/{name}/drain") && <td><Maintenance node={n} user={user} compact /></td>}
                </tr>
              );
            })}
          </tbody>
        </table>
      )}
      {nodes.more && <button type="button" onClick={nodes.loadMore}>Load more</button>}
    </>
  );
}

export function NodeDetail({ name, user }: { name: string; user: Me | null }) {
  const path = `nodes/${encodeURIComponent(name)}`;
  const node = useFetch<Node>(path);
  const [live, setLive] = useState<Node | null>(null);
  usePoll(() => {
    setLive(null);
    node.reload();
  }, 15000); // heartbeats are not events
  const [bench, setBench] = useState<Task | null>(null);
  const [benchError, setBenchError] = useState<ApiError | null>(null);
  const now = useTick();

  useLive(["node"], (e) => {
    if (e.name === name && e.verb !== "deleted") setLive(e.object as unknown as Node);
  });
  useLive(["task"], (e) => {
    if (bench && e.id === bench.id) setBench(e.object as unknown as Task);
  });

  async function benchmark() {
    setBenchError(null);
    try {
      const task = await post<Task>(`${path}/benchmark`, { seconds: 5 });
      setBench(task);
      // The event stream may already have passed the task's first updates.
      get<Task>(`tasks/${task.id}`).then((t) => setBench((b) => (b && b.id === t.id && b.state === "pending" ? t : b))).catch(() => {});
    } catch (e) {
      setBenchError(e instanceof ApiError ? e : new ApiError(0, "Error", String(e)));
    }
  }

  const n = live ?? node.data;
  if (node.error) return <><PageHeader title={name} /><ErrorBox error={node.error} onRetry={node.reload} /></>;
  if (!n) return <><PageHeader title={name} /><Loading what="node" /></>;
  const inv = n.status.inventory ?? {};
  const busy = bench && (bench.state === "pending" || bench.state === "running");

  return (
    <>
      <nav class="crumbs" aria-label="Breadcrumb"><a href="/nodes">Nodes</a> / <span aria-current="page">{n.name}</span></nav>
      <PageHeader title={n.name}>
        <NodePhase node={n} />
        {user && <Maintenance node={n} user={user} />}
        {canOperate(user) && (
          <button type="button" onClick={benchmark} disabled={!!busy}>{busy ? "Benchmark running…" : "Run benchmark"}</button>
        )}
      </PageHeader>
      <ErrorBox error={benchError} />
      {bench && (
        <section class="card bench" aria-live="polite" aria-labelledby="bench-h">
          <h2 id="bench-h">Benchmark <Badge value={bench.state} /> <a href="/tasks" class="muted small">all tasks</a></h2>
          <Progress percent={bench.progress?.percent ?? 0} state={bench.state} label="Benchmark progress" />
          <p class="muted">{bench.progress?.message}</p>
          {bench.error && <ErrorBox error={bench.error} />}
          {bench.result && (
            <dl class="kv">
              {Object.entries(bench.result).map(([k, v]) => <div key={k}><dt>{resultLabel(k)}</dt><dd>{resultValue(v)}</dd></div>)}
            </dl>
          )}
        </section>
      )}
      <div class="cards">
        <section class="card" aria-labelledby="sys-h">
          <h2 id="sys-h">System</h2>
          <dl class="kv">
            <div><dt>CPU model</dt><dd>{inv.cpu_model ?? "—"}</dd></div>
            <div><dt>Cores / threads</dt><dd>{inv.cores ?? "—"} / {inv.threads ?? "—"}</dd></div>
            <div><dt>NUMA nodes</dt><dd>{inv.numa_nodes ?? "—"}</dd></div>
            <div><dt>Memory</dt><dd>{bytes(inv.memory_bytes)}</dd></div>
            <div><dt>Virtualization</dt><dd>{inv.virt_type ?? "—"}{typeof inv.virt_reason === "string" && <><br /><small class="muted">{inv.virt_reason}</small></>}</dd></div>
            {typeof inv.os === "string" && <div><dt>OS</dt><dd>{inv.os}</dd></div>}
            <div><dt>Kernel</dt><dd>{inv.kernel ?? "—"}</dd></div>
            <div><dt>Last heartbeat</dt><dd title={when(n.status.last_heartbeat)}>{ago(n.status.last_heartbeat, now)}</dd></div>
            <div><dt>Schedulable</dt><dd>{n.spec.schedulable === false ? "no (cordoned)" : "yes"}</dd></div>
          </dl>
        </section>
        <section class="card" aria-labelledby="alloc-h">
          <h2 id="alloc-h">Capacity</h2>
          <CapacityBars nodes={[n]} />
        </section>
      </div>
      <History path={path} what="node" />
      <section class="section" aria-labelledby="disks-h">
        <h2 id="disks-h">Disks</h2>
        {inv.disks?.length ? (
          <table class="table">
            <thead><tr><th>Name</th><th>Model</th><th>Size</th><th>Type</th></tr></thead>
            <tbody>{inv.disks.map((d) => (
              <tr key={d.name}><td>{d.name}</td><td>{d.model || "—"}</td><td>{bytes(d.size_bytes)}</td><td>{d.rotational ? "HDD" : "SSD / virtual"}</td></tr>
            ))}</tbody>
          </table>
        ) : <Empty>No disks reported.</Empty>}
      </section>
      <section class="section" aria-labelledby="nics-h">
        <h2 id="nics-h">Network interfaces</h2>
        {inv.nics?.length ? (
          <table class="table">
            <thead><tr><th>Name</th><th>MAC</th><th>MTU</th><th>Speed</th><th>Addresses</th></tr></thead>
            <tbody>{inv.nics.map((c) => (
              <tr key={c.name}><td>{c.name}</td><td><code>{c.mac || "—"}</code></td><td>{c.mtu ?? "—"}</td><td>{speed(c.speed_mbps)}</td>
                <td>{c.addresses?.length ? c.addresses.join(", ") : "—"}</td></tr>
            ))}</tbody>
          </table>
        ) : <Empty>No network interfaces reported.</Empty>}
      </section>
      <Conditions conditions={n.conditions} />
    </>
  );
}
