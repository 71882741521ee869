/** Volumes: the list, a create dialog, and one volume's detail with its snapshots. */

import { useEffect, useState } from "preact/hooks";
import {
  ApiError, asError, canWrite, del, post, type Me, type Page, type Resource, type Task, type Volume, type VolumeSnapshot,
} from "../api";
import { Progress } from "../components/charts";
import { Confirm, Dialog } from "../components/dialog";
import { Badge, Conditions, Empty, ErrorBox, Loading, PageHeader } from "../components/ui";
import { bytes, when } from "../format";
import { taskActive, useFetch, useLiveList, useResourceTasks } from "../hooks";
import { useLive } from "../live";
import { navigate } from "../router";

const PHASE_TONE: Record<string, string> = { Available: "ok", Pending: "info", Creating: "info", Failed: "bad", Error: "bad" };

function volumePath(name: string, project: string, sub = ""): string {
  return `volumes/${encodeURIComponent(name)}${sub}?project=${encodeURIComponent(project)}`;
}

function volumeHref(name: string, project: string | null): string {
  const q = project && project !== "default" ? `?project=${encodeURIComponent(project)}` : "";
  return `/volumes/${encodeURIComponent(name)}${q}`;
}

function PhaseBadge({ vol }: { vol: Volume }) {
  const phase = vol.status.phase ?? "Pending";
  return <Badge value={phase} tone={PHASE_TONE[phase] ?? "muted"} />;
}

/** A size field: a number and a unit, sent as "10GiB". */
function SizeField({ label, value, unit, onValue, onUnit, required = true }: {
  label: string; value: string; unit: string; onValue: (v: string) => void; onUnit: (u: string) => void; required?: boolean;
}) {
  return (
    <div class="field">
      <label for="size">{label}</label>
      <span class="with-unit">
        <input id="size" name="size" type="number" min={1} step="any" required={required} value={value}
          onInput={(e) => onValue((e.target as HTMLInputElement).value)} />
        <select aria-label={`${label} unit`} value={unit} onChange={(e) => onUnit((e.target as HTMLSelectElement).value)}>
          <option>MiB</option><option>GiB</option><option>TiB</option>
        </select>
      </span>
    </div>
  );
}

function CreateVolumeDialog({ user, onClose, onCreated, from }: {
  user: Me;
  onClose: () => void;
  onCreated: (name: string, project: string, task: Task) => void;
  from?: { volume: string; snapshot: string; project: string }; // clone a snapshot
}) {
  const projects = useFetch<Page<Resource>>("projects?limit=100");
  const writable = (projects.data?.items ?? []).map((p) => p.name).filter((p) => canWrite(user, p));
  const pools = useFetch<Page<Resource>>("pools?limit=100");
  const [project, setProject] = useState(from?.project ?? "default");
  const [name, setName] = useState("");
  const [size, setSize] = useState(from ? "" : "10");
  const [unit, setUnit] = useState("GiB");
  const [pool, setPool] = useState("");
  const [klass, setKlass] = useState<"dedup" | "rbd">("dedup");
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<ApiError | null>(null);
  const poolNames = (pools.data?.items ?? []).map((p) => p.name);

  async function submit(e: Event) {
    e.preventDefault();
    setBusy(true);
    setError(null);
    try {
      let task: Task;
      if (from) {
        const body: Record<string, unknown> = { snapshot: from.snapshot, name: name.trim() };
        if (size) body.size = `${size}${unit}`;
        task = await post<Task>(volumePath(from.volume, from.project, "/clone"), body);
      } else {
        const body: Record<string, unknown> = { name: name.trim(), project, size: `${size}${unit}`, class: klass };
        if (pool) body.pool = pool;
        task = await post<Task>("volumes", body);
      }
      onCreated(name.trim(), from?.project ?? project, task);
    } catch (err) {
      setError(asError(err));
    } finally {
      setBusy(false);
    }
  }

  return (
    <Dialog title={from ? `Clone snapshot ${from.snapshot} of ${from.volume}` : "Create volume"} onClose={onClose} wide={!from}>
      <form onSubmit={submit}>
        <div class={from ? "dialog-body form-grid one" : "dialog-body form-grid"}>
          <label class="field">Name
            <input name="name" required maxLength={63} pattern="[a-z0-9]([a-z0-9\-]*[a-z0-9])?" value={name}
              onInput={(e) => setName((e.target as HTMLInputElement).value)} title="lower-case letters, digits and '-'" />
          </label>
          {!from && (
            <label class="field">Project
              <select name="project" value={project} onChange={(e) => setProject((e.target as HTMLSelectElement).value)}>
                {(writable.length ? writable : [project]).map((p) => <option key={p} value={p}>{p}</option>)}
              </select>
            </label>
          )}
          <SizeField label={from ? "Size (empty: the snapshot's)" : "Size"} value={size} unit={unit} onValue={setSize}
            onUnit={setUnit} required={!from} />
          {!from && (
            <>
              <label class="field">Class
                <select name="class" value={klass} onChange={(e) => setKlass((e.target as HTMLSelectElement).value as "dedup" | "rbd")}>
                  <option value="dedup">dedup (O(1) snapshots, clones)</option>
                  <option value="rbd">rbd (Ceph RBD)</option>
                </select>
              </label>
              <label class="field">Pool
                <select name="pool" value={pool} onChange={(e) => setPool((e.target as HTMLSelectElement).value)}>
                  <option value="">default</option>
                  {poolNames.filter((p) => p !== "default").map((p) => <option key={p} value={p}>{p}</option>)}
                </select>
              </label>
            </>
          )}
        </div>
        <div class="dialog-errors"><ErrorBox error={error} /></div>
        <footer class="dialog-footer">
          <button type="button" onClick={onClose}>Cancel</button>
          <button type="submit" class="primary" disabled={busy}>{busy ? "Creating…" : from ? "Clone" : "Create volume"}</button>
        </footer>
      </form>
    </Dialog>
  );
}

export function VolumeList({ user }: { user: Me }) {
  const list = useLiveList<Volume>("volumes", "volume");
  const tasks = useResourceTasks("volume");
  const [creating, setCreating] = useState(false);
  const mayCreate = canWrite(user, "default") || user.roles.some((r) => r.role !== "viewer");
  return (
    <>
      <PageHeader title="Volumes">
        {mayCreate && <button type="button" class="primary" onClick={() => setCreating(true)}>Create volume</button>}
      </PageHeader>
      <ErrorBox error={list.error} onRetry={list.reload} />
      {list.loading && list.items.length === 0 && <Loading what="volumes" />}
      {!list.loading && !list.error && list.items.length === 0 && <Empty>No volumes yet.</Empty>}
      {list.items.length > 0 && (
        <table class="table instances">
          <thead><tr><th>Name</th><th>Project</th><th>Pool</th><th>Class</th><th>Size</th><th class="w-state">State</th><th>Created</th></tr></thead>
          <tbody>{list.items.map((v) => {
            const task = tasks.byResource.get(v.id);
            return (
              <tr key={v.id}>
                <td><a href={volumeHref(v.name, v.project)}><b>{v.name}</b></a></td>
                <td>{v.project ?? "—"}</td>
                <td>{v.spec.pool ?? "—"}</td>
                <td>{v.spec.class ?? v.status.class ?? "—"}</td>
                <td>{bytes(v.status.size_bytes ?? v.spec.size_bytes)}</td>
                <td><PhaseBadge vol={v} />{v.status.task_state && <> <span class="muted small">{v.status.task_state}</span></>}
                  {taskActive(task) && (
                    <div class="row-progress">
                      <Progress percent={task!.progress?.percent ?? 0} state={task!.state} label={`${v.name}: ${task!.name}`} />
                      <small class="muted">{task!.progress?.message}</small>
                    </div>
                  )}</td>
                <td>{when(v.created_at)}</td>
              </tr>
            );
          })}</tbody>
        </table>
      )}
      {list.more && <button type="button" onClick={list.loadMore}>Load more</button>}
      {creating && (
        <CreateVolumeDialog user={user} onClose={() => setCreating(false)} onCreated={(name, project, task) => {
          tasks.track(task);
          setCreating(false);
          navigate(volumeHref(name, project));
        }} />
      )}
    </>
  );
}

type Asking = { what: "snapshot" | "resize" | "delete" } | { what: "rollback" | "clone" | "delete-snapshot"; snapshot: string };

export function VolumeDetail({ name, project, user }: { name: string; project: string; user: Me }) {
  const vol = useFetch<Volume>(volumePath(name, project));
  const snaps = useFetch<{ items: VolumeSnapshot[] }>(volumePath(name, project, "/snapshots"));
  const [live, setLive] = useState<Volume | null>(null);
  const [gone, setGone] = useState(false);
  const [asking, setAsking] = useState<Asking | null>(null);
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<ApiError | null>(null);
  const [snapName, setSnapName] = useState("");
  const [size, setSize] = useState("");
  const [unit, setUnit] = useState("GiB");
  const tasks = useResourceTasks("volume");

  useLive(["volume"], (e) => {
    if (e.name !== name || (e.project ?? "default") !== project) return;
    if (e.verb === "deleted") setGone(true);
    else setLive(e.object as unknown as Volume);
  });
  const v = live ?? vol.data;
  const task = v ? tasks.byResource.get(v.id) : undefined;
  // A finished snapshot, rollback or clone changes the snapshot list: read it again.
  useEffect(() => {
    if (task && task.state === "succeeded") snaps.reload();
  }, [task?.id, task?.state]);

  const crumbs = <nav class="crumbs" aria-label="Breadcrumb"><a href="/volumes">Volumes</a> / <span aria-current="page">{name}</span></nav>;
  if (gone) return <>{crumbs}<PageHeader title={name} /><p class="notice">This volume was deleted. <a href="/volumes">Back to Volumes</a></p></>;
  if (vol.error && !v) return <>{crumbs}<PageHeader title={name} /><ErrorBox error={vol.error} onRetry={vol.reload} /></>;
  if (!v) return <>{crumbs}<PageHeader title={name} /><Loading what="volume" /></>;
  const writer = canWrite(user, v.project);
  const idle = !v.status.task_state && !taskActive(task);

  async function run(fn: () => Promise<Task>, after?: () => void) {
    setBusy(true);
    setError(null);
    try {
      tasks.track(await fn());
      setAsking(null);
      after?.();
    } catch (e) {
      setAsking(null);
      setError(asError(e));
    } finally {
      setBusy(false);
    }
  }

  return (
    <>
      {crumbs}
      <PageHeader title={v.name}>
        <PhaseBadge vol={v} />
        {writer && (
          <div class="actions" role="group" aria-label="Volume actions">
            <button type="button" disabled={busy || !idle} onClick={() => { setSnapName(""); setAsking({ what: "snapshot" }); }}>Take snapshot</button>
            <button type="button" disabled={busy || !idle} onClick={() => { setSize(""); setAsking({ what: "resize" }); }}>Resize…</button>
            <button type="button" class="danger" disabled={busy || !idle} onClick={() => setAsking({ what: "delete" })}>Delete</button>
          </div>
        )}
      </PageHeader>
      <ErrorBox error={error} />
      {task && (
        <section class="card task-card" aria-live="polite" aria-labelledby="task-h">
          <h2 id="task-h">{task.name} <Badge value={task.state} /> <a href="/tasks" class="muted small">all tasks</a></h2>
          <Progress percent={task.state === "succeeded" ? 100 : task.progress?.percent ?? 0} state={task.state} label="Task progress" />
          <p class={task.error ? "error-text" : "muted"}>{task.error ?? task.progress?.message}</p>
        </section>
      )}
      <div class="cards">
        <section class="card" aria-labelledby="vol-h">
          <h2 id="vol-h">Volume</h2>
          <dl class="kv">
            <div><dt>Project</dt><dd>{v.project}</dd></div>
            <div><dt>Pool</dt><dd>{v.spec.pool}</dd></div>
            <div><dt>Class</dt><dd>{v.spec.class ?? v.status.class}</dd></div>
            <div><dt>Size</dt><dd>{bytes(v.status.size_bytes ?? v.spec.size_bytes)}</dd></div>
            <div><dt>State</dt><dd><PhaseBadge vol={v} />{v.status.message && <> <span class="muted">{v.status.message}</span></>}</dd></div>
            {Object.keys(v.spec.labels ?? {}).length > 0 && (
              <div><dt>Labels</dt><dd>{Object.entries(v.spec.labels ?? {}).map(([k, val]) => <span key={k} class="chip">{k}={val}</span>)}</dd></div>
            )}
            <div><dt>Export</dt><dd><code>{v.status.export ?? "—"}</code></dd></div>
            <div><dt>Created</dt><dd>{when(v.created_at)}</dd></div>
          </dl>
        </section>
      </div>
      <section class="section" aria-labelledby="snaps-h">
        <h2 id="snaps-h">Snapshots</h2>
        <ErrorBox error={snaps.error} onRetry={snaps.reload} />
        {snaps.data && snaps.data.items.length === 0 && <Empty>No snapshots yet: a snapshot is O(1), whatever the volume's size.</Empty>}
        {snaps.data && snaps.data.items.length > 0 && (
          <table class="table">
            <thead><tr><th>Name</th><th>Size</th><th>Taken</th>{writer && <th><span class="sr-only">Actions</span></th>}</tr></thead>
            <tbody>{snaps.data.items.map((s) => (
              <tr key={s.id ?? s.name}>
                <td><b>{s.name}</b></td>
                <td>{bytes(s.size_bytes)}</td>
                <td>{when(s.created_at)}</td>
                {writer && (
                  <td class="row-actions">
                    <button type="button" class="small" disabled={busy || !idle} onClick={() => setAsking({ what: "rollback", snapshot: s.name })}>Roll back</button>
                    <button type="button" class="small" disabled={busy || !idle} onClick={() => setAsking({ what: "clone", snapshot: s.name })}>Clone…</button>
                    <button type="button" class="small danger" disabled={busy || !idle} onClick={() => setAsking({ what: "delete-snapshot", snapshot: s.name })}>Delete</button>
                  </td>
                )}
              </tr>
            ))}</tbody>
          </table>
        )}
      </section>
      <Conditions conditions={v.conditions} />

      {asking?.what === "snapshot" && (
        <Dialog title={`Snapshot of ${v.name}`} onClose={() => setAsking(null)}>
          <form onSubmit={(e) => { e.preventDefault(); run(() => post<Task>(volumePath(name, project, "/snapshots"), { name: snapName.trim() })); }}>
            <div class="dialog-body">
              <label class="field">Snapshot name
                <input name="snapshot" required maxLength={63} pattern="[a-z0-9]([a-z0-9\-]*[a-z0-9])?" value={snapName}
                  onInput={(e) => setSnapName((e.target as HTMLInputElement).value)} />
              </label>
            </div>
            <footer class="dialog-footer">
              <button type="button" onClick={() => setAsking(null)}>Cancel</button>
              <button type="submit" class="primary" disabled={busy}>Take snapshot</button>
            </footer>
          </form>
        </Dialog>
      )}
      {asking?.what === "resize" && (
        <Dialog title={`Resize ${v.name}`} onClose={() => setAsking(null)}>
          <form onSubmit={(e) => { e.preventDefault(); run(() => post<Task>(volumePath(name, project, "/resize"), { size: `${size}${unit}` })); }}>
            <div class="dialog-body">
              <p class="muted">Now {bytes(v.status.size_bytes ?? v.spec.size_bytes)}. Volumes grow; shrinking is refused here because it loses the data past the new end.</p>
              <SizeField label="New size" value={size} unit={unit} onValue={setSize} onUnit={setUnit} />
            </div>
            <footer class="dialog-footer">
              <button type="button" onClick={() => setAsking(null)}>Cancel</button>
              <button type="submit" class="primary" disabled={busy}>Resize</button>
            </footer>
          </form>
        </Dialog>
      )}
      {asking?.what === "delete" && (
        <Confirm title={`Delete volume ${v.name}?`} confirm="Delete" danger busy={busy} onClose={() => setAsking(null)}
          onConfirm={() => run(() => del<Task>(volumePath(name, project)), () => navigate("/volumes"))}>
          <p>Its data and its snapshots go with it. A volume a VM uses, or that holds an image, cannot be deleted.</p>
        </Confirm>
      )}
      {asking?.what === "rollback" && (
        <Confirm title={`Roll ${v.name} back to ${asking.snapshot}?`} confirm="Roll back" danger busy={busy} onClose={() => setAsking(null)}
          onConfirm={() => run(() => post<Task>(volumePath(name, project, "/rollback"), { snapshot: asking.snapshot }))}>
          <p>The volume's content becomes the snapshot's again; what was written since is lost. Refused while a running VM uses it.</p>
        </Confirm>
      )}
      {asking?.what === "delete-snapshot" && (
        <Confirm title={`Delete snapshot ${asking.snapshot}?`} confirm="Delete" danger busy={busy} onClose={() => setAsking(null)}
          onConfirm={() => run(() => del<Task>(volumePath(name, project, `/snapshots/${encodeURIComponent(asking.snapshot)}`)))}>
          <p>The volume itself is not changed.</p>
        </Confirm>
      )}
      {asking?.what === "clone" && (
        <CreateVolumeDialog user={user} from={{ volume: v.name, snapshot: asking.snapshot, project }} onClose={() => setAsking(null)}
          onCreated={(n, p, t) => { tasks.track(t); setAsking(null); navigate(volumeHref(n, p)); }} />
      )}
    </>
  );
}
