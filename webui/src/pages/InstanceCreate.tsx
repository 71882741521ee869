/** The create dialog for VMs and containers: one form, a few fields more for containers. */

import { Fragment } from "preact";
import { useState } from "preact/hooks";
import {
  ApiError, canWrite, get, post, qs, type Image, type Me, type Network, type Page, type Resource, type Task, type Volume,
} from "../api";
import { Dialog } from "../components/dialog";
import { ErrorBox } from "../components/ui";
import { useFetch } from "../hooks";
import type { InstanceKindInfo } from "../instances";

/** Words of a command line, with '…' / "…" quoting and \ escapes (no expansion: nothing runs a shell). */
export function splitCommand(line: string): string[] {
  const words: string[] = [];
  let word = "";
  let inWord = false;
  let quote: string | null = null;
  for (let i = 0; i < line.length; i++) {
    const c = line[i];
    if (quote) {
      if (c === quote) quote = null;
      else if (c === "\\" && quote === '"' && i + 1 < line.length) word += line[++i];
      else word += c;
    } else if (c === "'" || c === '"') {
      quote = c;
      inWord = true;
    } else if (c === "\\" && i + 1 < line.length) {
      word += line[++i];
      inWord = true;
    } else if (/\s/.test(c)) {
      if (inWord) words.push(word);
      word = "";
      inWord = false;
    } else {
      word += c;
      inWord = true;
    }
  }
  if (quote) throw new Error(`the command has an unclosed ${quote} quote`);
  if (inWord) words.push(word);
  return words;
}

function Checklist({ legend, items, chosen, onChange, empty }: {
  legend: string; items: string[]; chosen: string[]; onChange: (v: string[]) => void; empty: string;
}) {
  return (
    <fieldset class="field checklist">
      <legend>{legend}</legend>
      {items.length === 0 ? <p class="hint">{empty}</p> : items.map((n) => (
        <label key={n} class="check">
          <input type="checkbox" checked={chosen.includes(n)}
            onChange={(e) => onChange((e.target as HTMLInputElement).checked ? [...chosen, n] : chosen.filter((c) => c !== n))} />
          {n}
        </label>
      ))}
    </fieldset>
  );
}

export function CreateInstanceDialog({ info, user, onClose, onCreated }: {
  info: InstanceKindInfo;
  user: Me;
  onClose: () => void;
  onCreated: (inst: { name: string; project: string }, task: Task) => void;
}) {
  const isContainer = info.kind === "container";
  const projects = useFetch<Page<Resource>>("projects?limit=100");
  const writable = (projects.data?.items ?? []).map((p) => p.name).filter((p) => canWrite(user, p));
  const [project, setProject] = useState("default");
  const images = useFetch<Page<Image>>(`images${qs({ project, limit: 100 })}`);
  const networks = useFetch<Page<Network>>(`networks${qs({ project, limit: 100 })}`);
  const groups = useFetch<Page<Resource>>(`security-groups${qs({ project, limit: 100 })}`);
  // VMs attach volumes as disks, containers mount them at a path; the list is there only when the API has storage.
  const volumes = useFetch<Page<Volume>>(`volumes${qs({ project, limit: 100 })}`);
  const fitting = (images.data?.items ?? []).filter((i) => i.spec.kind === info.kind);

  const [name, setName] = useState("");
  const [image, setImage] = useState("");
  const [cpu, setCpu] = useState(isContainer ? "0.5" : "1");
  const [memory, setMemory] = useState(isContainer ? "64" : "256");
  const [unit, setUnit] = useState("MiB");
  const [nets, setNets] = useState<string[]>([]);
  const [secgroups, setSecgroups] = useState<string[]>([]);
  const [disks, setDisks] = useState<string[]>([]);
  const [mountPaths, setMountPaths] = useState<Record<string, string>>({});
  const [mountFs, setMountFs] = useState<Record<string, string>>({});
  const [rootSize, setRootSize] = useState("");
  const [command, setCommand] = useState("");
  const [tty, setTty] = useState(false);
  const [isolation, setIsolation] = useState<"container" | "vm">("container");
  const [start, setStart] = useState(true);
  const [ha, setHa] = useState(false);
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<ApiError | Error | null>(null);
  const [importing, setImporting] = useState<string | null>(null);

  const chosenImage = image && fitting.some((i) => i.name === image) ? image : fitting[0]?.name ?? "";
  const diskImage = fitting.find((i) => i.name === chosenImage)?.spec.format === "disk";

  async function importTestGuest() {
    setError(null);
    setImporting("Importing the test images…");
    try {
      const task = await post<Task>("images/import-test-guest", { project });
      // A few seconds: the images are built from this node's packages. Poll the task, then reload the list.
      for (let i = 0; i < 120; i++) {
        const t = await get<Task>(`tasks/${task.id}`);
        if (t.state === "failed" || t.state === "cancelled") throw new ApiError(0, "Import failed", t.error ?? t.state);
        if (t.state === "succeeded") break;
        await new Promise((r) => setTimeout(r, 500));
      }
      images.reload();
    } catch (e) {
      setError(e instanceof Error ? e : new Error(String(e)));
    } finally {
      setImporting(null);
    }
  }

  async function submit(e: Event) {
    e.preventDefault();
    setError(null);
    let words: string[] = [];
    try {
      words = splitCommand(command);
    } catch (err) {
      setError(err as Error);
      return;
    }
    const spec: Record<string, unknown> = {
      image: chosenImage,
      cpu: Number(cpu),
      memory: `${memory}${unit}`,
      networks: nets,
      power: start ? "running" : "stopped",
    };
    if (secgroups.length) spec.security_groups = secgroups;
    if (ha) spec.ha = true;
    if (disks.length) {
      spec.volumes = isContainer
        ? disks.map((v) => ({ volume: v, path: (mountPaths[v] ?? "").trim() || `/mnt/${v}`, fs: mountFs[v] ?? "ext4" }))
        : disks;
    }
    if (diskImage && rootSize) spec.root_size = `${rootSize}GiB`;
    if (isContainer) {
      if (words.length) spec.command = words;
      spec.tty = tty;
      spec.isolation = isolation;
    }
    setBusy(true);
    try {
      const task = await post<Task>(info.path, { name: name.trim(), project, spec });
      onCreated({ name: name.trim(), project }, task);
    } catch (err) {
      setError(err instanceof Error ? err : new Error(String(err)));
    } finally {
      setBusy(false);
    }
  }

  return (
    <Dialog title={`Create ${info.one}`} onClose={onClose} wide>
      <form class="form" onSubmit={submit}>
        <div class="dialog-body form-grid">
          <label class="field">Name
            <input name="name" required maxLength={63} pattern="[a-z0-9]([a-z0-9\-]*[a-z0-9])?" value={name}
              onInput={(e) => setName((e.target as HTMLInputElement).value)}
              title="lower-case letters, digits and '-'" />
          </label>
          <label class="field">Project
            <select name="project" value={project} onChange={(e) => setProject((e.target as HTMLSelectElement).value)}>
              {(writable.length ? writable : [project]).map((p) => <option key={p} value={p}>{p}</option>)}
            </select>
          </label>
          <label class="field span2">Image
            <select name="image" required value={chosenImage} disabled={fitting.length === 0}
              onChange={(e) => setImage((e.target as HTMLSelectElement).value)}>
              {fitting.length === 0 && <option value="">{images.loading ? "loading…" : `no ${info.one} images`}</option>}
              {fitting.map((i) => <option key={i.id} value={i.name}>{i.name} ({i.spec.format})</option>)}
            </select>
          </label>
          {!images.loading && fitting.length === 0 && (
            <p class="hint span2">
              Project <b>{project}</b> has no {info.one} image yet.{" "}
              <button type="button" class="link-button" disabled={!!importing} onClick={importTestGuest}>
                Import the test images (tiny-guest, busybox)
              </button>{importing && <> {importing}</>}
            </p>
          )}
          <label class="field">{isContainer ? "CPU limit (cores)" : "vCPUs"}
            <input name="cpu" type="number" required min={isContainer ? 0.1 : 1} max={256} step={isContainer ? 0.1 : 1}
              value={cpu} onInput={(e) => setCpu((e.target as HTMLInputElement).value)} />
          </label>
          <div class="field">
            <label for="memory">Memory</label>
            <span class="with-unit">
              <input id="memory" name="memory" type="number" required min={1} step="any" value={memory}
                onInput={(e) => setMemory((e.target as HTMLInputElement).value)} />
              <select aria-label="Memory unit" value={unit} onChange={(e) => setUnit((e.target as HTMLSelectElement).value)}>
                <option>MiB</option><option>GiB</option>
              </select>
            </span>
          </div>
          {diskImage && (
            <label class="field">Root disk size (GiB)
              <input name="root_size" type="number" min={1} step="any" placeholder="the image's" value={rootSize}
                onInput={(e) => setRootSize((e.target as HTMLInputElement).value)} />
            </label>
          )}
          {isContainer && (
            <>
              <label class="field span2">Command
                <input name="command" class="mono" placeholder="the image's default command" value={command}
                  onInput={(e) => setCommand((e.target as HTMLInputElement).value)} />
              </label>
              <label class="field">Isolation
                <select name="isolation" value={isolation}
                  onChange={(e) => setIsolation((e.target as HTMLSelectElement).value as "container" | "vm")}>
                  <option value="container">container (shared kernel)</option>
                  <option value="vm">vm (its own microVM)</option>
                </select>
              </label>
              <label class="check field-check">
                <input type="checkbox" name="tty" checked={tty} onChange={(e) => setTty((e.target as HTMLInputElement).checked)} />
                Interactive terminal (TTY)
              </label>
            </>
          )}
          <Checklist legend="Networks" items={(networks.data?.items ?? []).map((n) => n.name)} chosen={nets} onChange={setNets}
            empty={networks.loading ? "Loading…" : `No networks in project ${project}: the ${info.one} gets no network interface.`} />
          <Checklist legend="Security groups" items={(groups.data?.items ?? []).map((g) => g.name)} chosen={secgroups}
            onChange={setSecgroups} empty={groups.loading ? "Loading…" : "None: the project's default group applies."} />
          {volumes.data && (
            <Checklist legend={isContainer ? "Volumes to mount" : "Volumes to attach"} chosen={disks} onChange={setDisks}
              items={volumes.data.items.filter((v) => isContainer || (v.spec.class ?? "dedup") === "dedup").map((v) => v.name)}
              empty={`No volumes in project ${project}${diskImage ? " (the root disk is cloned from the image)" : ""}.`} />
          )}
          {isContainer && disks.map((v) => (
            <Fragment key={v}>
              <label class="field">Mount path of {v}
                <input name={`path-${v}`} class="mono" value={mountPaths[v] ?? ""} placeholder={`/mnt/${v}`}
                  onInput={(e) => setMountPaths({ ...mountPaths, [v]: (e.target as HTMLInputElement).value })} />
              </label>
              <label class="field">Filesystem of {v}
                <select name={`fs-${v}`} value={mountFs[v] ?? "ext4"}
                  onChange={(e) => setMountFs({ ...mountFs, [v]: (e.target as HTMLSelectElement).value })}>
                  <option value="ext4">ext4</option>
                  <option value="xfs">xfs (300 MiB or more)</option>
                </select>
              </label>
            </Fragment>
          ))}
          {isContainer && disks.length > 0 && (
            <p class="hint span2">A blank volume is formatted on first use; one that holds a filesystem keeps it.</p>
          )}
          <label class="check field-check span2">
            <input type="checkbox" name="ha" checked={ha} onChange={(e) => setHa((e.target as HTMLInputElement).checked)} />
            High availability: restart it on another node if its node fails
          </label>
          <label class="check field-check span2">
            <input type="checkbox" name="start" checked={start} onChange={(e) => setStart((e.target as HTMLInputElement).checked)} />
            Start after creation
          </label>
        </div>
        <div class="dialog-errors"><ErrorBox error={error} /></div>
        <footer class="dialog-footer">
          <button type="button" onClick={onClose}>Cancel</button>
          <button type="submit" class="primary" disabled={busy || !chosenImage}>{busy ? "Creating…" : `Create ${info.one}`}</button>
        </footer>
      </form>
    </Dialog>
  );
}
