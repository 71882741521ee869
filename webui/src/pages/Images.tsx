/** Images: the list, an upload with its progress (the bytes, then the import task), delete. */

import { useRef, useState } from "preact/hooks";
import {
  canWrite, del, qs, upload, type Image, type Me, type Page, type Pool, type Resource, type Task,
} from "../api";
import { Progress } from "../components/charts";
import { Confirm, Dialog } from "../components/dialog";
import { Badge, Empty, ErrorBox, Loading, PageHeader } from "../components/ui";
import { bytes, when } from "../format";
import { taskActive, useAction, useFetch, useLiveList, useResourceTasks, type ResourceTasks } from "../hooks";

const PHASE_TONE: Record<string, string> = { Available: "ok", Importing: "info", Failed: "bad", Error: "bad" };

/** "Debian 12 (nocloud).qcow2" → "debian-12-nocloud": a name the API accepts. */
export function imageName(file: string): string {
  return file.replace(/\.(qcow2|raw|img|iso)$/i, "").toLowerCase().replace(/[^a-z0-9]+/g, "-")
    .replace(/^-+|-+$/g, "").slice(0, 63).replace(/-+$/, "") || "image";
}

function UploadDialog({ user, tasks, onClose }: { user: Me; tasks: ResourceTasks; onClose: () => void }) {
  const projects = useFetch<Page<Resource>>("projects?limit=100");
  const pools = useFetch<Page<Pool>>("pools?limit=100");
  const writable = (projects.data?.items ?? []).map((p) => p.name).filter((p) => canWrite(user, p));
  const [file, setFile] = useState<File | null>(null);
  const [name, setName] = useState("");
  const [project, setProject] = useState("default");
  const [format, setFormat] = useState("");
  const [pool, setPool] = useState("");
  const [sent, setSent] = useState<[number, number] | null>(null);
  const [task, setTask] = useState<Task | null>(null);
  const action = useAction();
  const abort = useRef<AbortController | null>(null);
  const current = task ? tasks.byResource.get(task.resource?.id ?? "") ?? task : null;

  async function submit(e: Event) {
    e.preventDefault();
    if (!file) return;
    abort.current = new AbortController();
    setSent([0, file.size]);
    const started = await action.run(() => upload<Task>(
      `images/${encodeURIComponent(name.trim())}/upload${qs({ project, format, pool })}`, file,
      (n, total) => setSent([n, total]), abort.current!.signal));
    if (started) {
      tasks.track(started);
      setTask(started);
    } else setSent(null);
  }

  const uploading = action.busy;
  const done = current?.state === "succeeded";
  return (
    <Dialog title="Upload image" onClose={() => { abort.current?.abort(); onClose(); }} wide>
      <form onSubmit={submit}>
        <div class="dialog-body form-grid">
          <label class="field span2">Disk image file (raw or qcow2)
            <input type="file" name="file" required disabled={uploading || !!task} accept=".qcow2,.raw,.img,application/octet-stream"
              onChange={(e) => {
                const f = (e.target as HTMLInputElement).files?.[0] ?? null;
                setFile(f);
                if (f && !name) setName(imageName(f.name));
              }} />
          </label>
          <label class="field">Name
            <input name="name" required maxLength={63} pattern="[a-z0-9]([a-z0-9\-]*[a-z0-9])?" value={name}
              disabled={uploading || !!task} onInput={(e) => setName((e.target as HTMLInputElement).value)} />
          </label>
          <label class="field">Project
            <select name="project" value={project} disabled={uploading || !!task}
              onChange={(e) => setProject((e.target as HTMLSelectElement).value)}>
              {(writable.length ? writable : [project]).map((p) => <option key={p} value={p}>{p}</option>)}
            </select>
          </label>
          <label class="field">Format
            <select name="format" value={format} disabled={uploading || !!task} onChange={(e) => setFormat((e.target as HTMLSelectElement).value)}>
              <option value="">detect</option><option value="qcow2">qcow2</option><option value="raw">raw</option>
            </select>
          </label>
          <label class="field">Pool
            <select name="pool" value={pool} disabled={uploading || !!task} onChange={(e) => setPool((e.target as HTMLSelectElement).value)}>
              <option value="">default</option>
              {(pools.data?.items ?? []).filter((p) => p.name !== "default").map((p) => <option key={p.id} value={p.name}>{p.name}</option>)}
            </select>
          </label>
          {sent && (
            <div class="field span2">
              <span>Upload <span class="muted">{bytes(sent[0])} of {bytes(sent[1])}</span></span>
              <Progress percent={sent[1] ? (100 * sent[0]) / sent[1] : 0} state={task ? "succeeded" : "running"} label="Upload progress" />
            </div>
          )}
          {current && (
            <div class="field span2" aria-live="polite">
              <span>Import into a volume <Badge value={current.state} /></span>
              <Progress percent={done ? 100 : current.progress?.percent ?? 0} state={current.state} label="Import progress" />
              <span class={current.error ? "error-text" : "muted"}>{current.error ?? current.progress?.message}</span>
            </div>
          )}
        </div>
        <div class="dialog-errors"><ErrorBox error={action.error} /></div>
        <footer class="dialog-footer">
          {task ? <button type="button" class="primary" onClick={onClose}>{done ? "Done" : "Close (the import goes on)"}</button> : (
            <>
              <button type="button" onClick={() => { abort.current?.abort(); onClose(); }}>Cancel</button>
              <button type="submit" class="primary" disabled={uploading || !file}>{uploading ? "Uploading…" : "Upload"}</button>
            </>
          )}
        </footer>
      </form>
    </Dialog>
  );
}

export function ImageList({ user }: { user: Me }) {
  const list = useLiveList<Image>("images", "image");
  const tasks = useResourceTasks("image");
  const [uploading, setUploading] = useState(false);
  const [deleting, setDeleting] = useState<Image | null>(null);
  const action = useAction();
  const mayUpload = canWrite(user, "default") || user.roles.some((r) => r.role !== "viewer");
  return (
    <>
      <PageHeader title="Images">
        {mayUpload && <button type="button" class="primary" onClick={() => setUploading(true)}>Upload image</button>}
      </PageHeader>
      <ErrorBox error={list.error} onRetry={list.reload} />
      <ErrorBox error={action.error} />
      {list.loading && list.items.length === 0 && <Loading what="images" />}
      {!list.loading && !list.error && list.items.length === 0 && <Empty>No images yet.</Empty>}
      {list.items.length > 0 && (
        <table class="table instances">
          <thead><tr><th>Name</th><th>Project</th><th>Kind</th><th>Format</th><th>Size</th><th class="w-state">State</th><th>Created</th>
            <th><span class="sr-only">Actions</span></th></tr></thead>
          <tbody>{list.items.map((i) => {
            const task = tasks.byResource.get(i.id);
            const phase = i.status.phase ?? "Available";
            const size = typeof i.spec.virtual_size === "number" ? i.spec.virtual_size : null;
            return (
              <tr key={i.id}>
                <td><b>{i.name}</b></td>
                <td>{i.project ?? "—"}</td>
                <td>{i.spec.kind}</td>
                <td>{i.spec.format}{typeof i.spec.source_format === "string" && <span class="muted"> (from {i.spec.source_format})</span>}</td>
                <td>{size !== null ? bytes(size) : "—"}</td>
                <td><Badge value={phase} tone={PHASE_TONE[phase] ?? "muted"} />
                  {taskActive(task) && (
                    <div class="row-progress">
                      <Progress percent={task!.progress?.percent ?? 0} state={task!.state} label={`${i.name}: ${task!.name}`} />
                      <small class="muted">{task!.progress?.message}</small>
                    </div>
                  )}</td>
                <td>{when(i.created_at)}</td>
                <td class="row-actions">{canWrite(user, i.project) && (
                  <button type="button" class="small danger" disabled={action.busy || taskActive(task)}
                    onClick={() => setDeleting(i)}>Delete</button>
                )}</td>
              </tr>
            );
          })}</tbody>
        </table>
      )}
      {list.more && <button type="button" onClick={list.loadMore}>Load more</button>}
      {uploading && <UploadDialog user={user} tasks={tasks} onClose={() => setUploading(false)} />}
      {deleting && (
        <Confirm title={`Delete image ${deleting.name}?`} confirm="Delete" danger busy={action.busy} onClose={() => setDeleting(null)}
          onConfirm={async () => {
            const img = deleting;
            setDeleting(null);
            await action.run(() => del(`images/${encodeURIComponent(img.name)}${qs({ project: img.project })}`));
          }}>
          <p>Instances made from it keep their disks (clones are independent); an image an instance still names cannot be deleted.</p>
        </Confirm>
      )}
    </>
  );
}
