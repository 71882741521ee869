/** Storage pools: capacity, what deduplication and compression save, health; one pool's
 * history; and the dashboard's storage card. */

import type { Pool, Page } from "../api";
import { MiniBar, StackedBar } from "../components/charts";
import { History } from "../components/history";
import { Badge, Conditions, Empty, ErrorBox, Loading, PageHeader } from "../components/ui";
import { bytes, when } from "../format";
import { useFetch, useLiveList, useThrottled } from "../hooks";
import { useLive } from "../live";

const HEALTH_TONE: Record<string, string> = { Ready: "ok", Pending: "info", Error: "bad" };

export function HealthBadge({ pool }: { pool: Pool }) {
  const phase = pool.status.phase ?? "Pending";
  return <Badge value={phase} tone={HEALTH_TONE[phase] ?? "muted"} />;
}

const ratio = (v: number | undefined) => (v ? `${v.toFixed(2)}×` : "—");

/** Share of the logical bytes that take no space thanks to dedup and compression. */
function saved(pool: Pool): string {
  const s = pool.status.stats ?? {};
  if (!s.logical_bytes || s.stored_bytes === undefined) return "—";
  return `${Math.max(0, 100 * (1 - s.stored_bytes / s.logical_bytes)).toFixed(0)} %`;
}

/** The file system (or cluster) the pool lives on: what the pool stores, what else is there, what is free. */
export function PoolCapacity({ pool }: { pool: Pool }) {
  const stored = pool.status.stats?.stored_bytes ?? 0;
  const cap = pool.status.capacity;
  if (!cap) {
    return <p class="muted small">Stores {bytes(stored)}; the capacity of its {pool.spec.backend ?? ""} backend is not reported.</p>;
  }
  const used = Math.max(0, cap.total_bytes - cap.free_bytes);
  return (
    <StackedBar label={`Capacity of pool ${pool.name}`} total={cap.total_bytes} format={bytes} segments={[
      { label: "stored by the pool", value: Math.min(stored, used), color: "var(--info)" },
      { label: "other data", value: Math.max(0, used - stored), color: "var(--muted-fill)" },
      { label: "free", value: cap.free_bytes, color: "var(--ok)" },
    ]} />
  );
}

export function PoolList() {
  const pools = useLiveList<Pool>("pools", "storage-pool");
  return (
    <>
      <PageHeader title="Storage pools" />
      <ErrorBox error={pools.error} onRetry={pools.reload} />
      {pools.loading && pools.items.length === 0 && <Loading what="pools" />}
      {!pools.loading && !pools.error && pools.items.length === 0 && (
        <Empty>No storage pool yet: the first node makes the <code>default</code> pool when its agent starts.</Empty>
      )}
      {pools.items.length > 0 && (
        <table class="table">
          <thead><tr><th>Name</th><th>Health</th><th>Node</th><th>Backend</th><th>Capacity used</th><th>Logical</th>
            <th>Stored</th><th>Dedup</th><th>Compression</th><th>Saved</th><th>Volumes</th></tr></thead>
          <tbody>{pools.items.map((p) => {
            const s = p.status.stats ?? {};
            const cap = p.status.capacity;
            return (
              <tr key={p.id}>
                <td><a href={`/pools/${encodeURIComponent(p.name)}`}><b>{p.name}</b></a></td>
                <td><HealthBadge pool={p} />{p.status.message && <div class="small error-text">{p.status.message}</div>}</td>
                <td>{p.status.node ?? "—"}</td>
                <td>{p.spec.backend}{p.spec.replication && p.spec.replication > 1 ? ` ×${p.spec.replication}` : ""}</td>
                <td>{cap ? <MiniBar label={`Capacity of ${p.name}`} used={cap.total_bytes - cap.free_bytes} total={cap.total_bytes}
                  text={`${bytes(cap.total_bytes - cap.free_bytes)} / ${bytes(cap.total_bytes)}`} /> : "—"}</td>
                <td>{bytes(s.logical_bytes)}</td>
                <td>{bytes(s.stored_bytes)}</td>
                <td>{ratio(s.dedup_ratio)}</td>
                <td>{ratio(s.compression_ratio)}</td>
                <td>{saved(p)}</td>
                <td>{s.volumes ?? "—"}</td>
              </tr>
            );
          })}</tbody>
        </table>
      )}
      {pools.more && <button type="button" onClick={pools.loadMore}>Load more</button>}
    </>
  );
}

export function PoolDetail({ name }: { name: string }) {
  const pool = useFetch<Pool>(`pools/${encodeURIComponent(name)}`);
  const crumbs = <nav class="crumbs" aria-label="Breadcrumb"><a href="/pools">Storage pools</a> / <span aria-current="page">{name}</span></nav>;
  const p = pool.data;
  if (!p) {
    return <>{crumbs}<PageHeader title={name} /><ErrorBox error={pool.error} onRetry={pool.reload} />
      {pool.loading && <Loading what="the pool" />}</>;
  }
  const s = p.status.stats ?? {};
  return (
    <>
      {crumbs}
      <PageHeader title={p.name}><HealthBadge pool={p} /></PageHeader>
      {p.status.message && <ErrorBox error={p.status.message} />}
      <div class="cards">
        <section class="card" aria-labelledby="space-h">
          <h2 id="space-h">Space</h2>
          <PoolCapacity pool={p} />
          <dl class="kv">
            <div><dt>Logical</dt><dd>{bytes(s.logical_bytes)} <span class="muted">as written by its volumes and snapshots</span></dd></div>
            <div><dt>Stored</dt><dd>{bytes(s.stored_bytes)} <span class="muted">after dedup and compression</span></dd></div>
            <div><dt>Dedup ratio</dt><dd>{ratio(s.dedup_ratio)}</dd></div>
            <div><dt>Compression ratio</dt><dd>{ratio(s.compression_ratio)}</dd></div>
            <div><dt>Saved</dt><dd>{saved(p)}</dd></div>
          </dl>
        </section>
        <section class="card" aria-labelledby="pool-h">
          <h2 id="pool-h">Pool</h2>
          <dl class="kv">
            <div><dt>Backend</dt><dd>{p.spec.backend}</dd></div>
            <div><dt>Location</dt><dd><code>{p.spec.url}</code></dd></div>
            <div><dt>Replication</dt><dd>{p.spec.replication ?? 1}</dd></div>
            <div><dt>Block size</dt><dd>{bytes(p.spec.chunk_size)}</dd></div>
            <div><dt>Served by</dt><dd>{p.status.node ?? "—"}</dd></div>
            <div><dt>Volumes</dt><dd>{s.volumes ?? "—"}</dd></div>
            <div><dt>Created</dt><dd>{when(p.created_at)}</dd></div>
          </dl>
        </section>
      </div>
      <History path={`pools/${encodeURIComponent(p.name)}`} what="pool" />
      <Conditions conditions={p.conditions} />
    </>
  );
}

/** The dashboard's storage card: every pool's capacity and savings, at a glance. */
export function StorageCard() {
  const pools = useFetch<Page<Pool>>("pools?limit=50");
  useLive(["storage-pool"], useThrottled(pools.reload, 2000));
  const items = pools.data?.items ?? [];
  const logical = items.reduce((a, p) => a + (p.status.stats?.logical_bytes ?? 0), 0);
  const stored = items.reduce((a, p) => a + (p.status.stats?.stored_bytes ?? 0), 0);
  return (
    <section class="card" aria-labelledby="storage-h" data-testid="storage-card">
      <h2 id="storage-h">Storage <a href="/pools" class="muted small">all pools</a></h2>
      <ErrorBox error={pools.error} onRetry={pools.reload} />
      {pools.loading && !pools.data && <Loading what="pools" />}
      {pools.data && items.length === 0 && <Empty>No storage pool yet.</Empty>}
      {items.length > 0 && (
        <>
          <p class="big-stat"><b>{bytes(logical)}</b> written, <b>{bytes(stored)}</b> stored
            {logical > 0 && <> — <b>{(logical / Math.max(1, stored)).toFixed(2)}×</b> saved by dedup and compression</>}</p>
          {items.map((p) => (
            <div key={p.id} class="pool-row">
              <h3><a href={`/pools/${encodeURIComponent(p.name)}`}>{p.name}</a> <HealthBadge pool={p} />{" "}
                <span class="muted">{p.spec.backend}, dedup {ratio(p.status.stats?.dedup_ratio)}, compression {ratio(p.status.stats?.compression_ratio)}</span></h3>
              <PoolCapacity pool={p} />
            </div>
          ))}
        </>
      )}
    </section>
  );
}
