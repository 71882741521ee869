/** VM and container pages: the list, one instance's detail with its lifecycle actions and consoles. */

import { useEffect, useState } from "preact/hooks";
import {
  ApiError, asError, canWrite, del, getText, offers, post, qs, type Instance, type Me, type Node, type Page, type Task,
} from "../api";
import { Progress } from "../components/charts";
import { History } from "../components/history";
import { Confirm, Dialog } from "../components/dialog";
import { Badge, Conditions, Empty, ErrorBox, Loading, PageHeader } from "../components/ui";
import { TerminalConsole } from "../consoles/TerminalConsole";
import { VncConsole } from "../consoles/VncConsole";
import { bytes, when } from "../format";
import { taskActive, useFetch, useLiveList, useResourceTasks } from "../hooks";
import {
  addressesOf, canAct, hasConsole, instanceHref, instancePath, type Action, type InstanceKindInfo,
} from "../instances";
import { useLive } from "../live";
import { navigate } from "../router";
import { CreateInstanceDialog } from "./InstanceCreate";

const POWER_TONE: Record<string, string> = {
  running: "ok", paused: "warn", shutdown: "muted", shutoff: "muted", crashed: "bad", nostate: "muted", blocked: "warn",
};
const STATE_TONE: Record<string, string> = { active: "ok", building: "info", stopped: "muted", paused: "warn", error: "bad" };

function PowerBadge({ inst }: { inst: Instance }) {
  const p = inst.status.power_state ?? "nostate";
  return <Badge value={p} tone={POWER_TONE[p] ?? "muted"} />;
}

/** vm_state, and the operation holding the instance (task_state) when there is one. */
function StateCell({ inst, task }: { inst: Instance; task?: Task }) {
  const v = inst.status.vm_state ?? "unknown";
  const busy = inst.status.task_state;
  return (
    <>
      <Badge value={v} tone={STATE_TONE[v] ?? "muted"} />
      {busy && <> <span class="muted small">{busy}</span></>}
      {taskActive(task) && (
        <div class="row-progress">
          <Progress percent={task!.progress?.percent ?? 0} state={task!.state} label={`${inst.name}: ${task!.name}`} />
          <small class="muted">{task!.progress?.message}</small>
        </div>
      )}
    </>
  );
}

const STATES = ["active", "building", "stopped", "paused", "migrating", "error"];

/** The list's filters live in the URL (?q=&state=), so a filtered list can be linked to. */
function useListFilters(): { text: string; setText: (t: string) => void; q: string; state: string; setState: (s: string) => void } {
  const params = new URLSearchParams(location.search);
  const [text, setText] = useState(params.get("q") ?? "");
  const [q, setQ] = useState(text);
  const [state, setState] = useState(params.get("state") ?? "");
  useEffect(() => {
    const t = setTimeout(() => setQ(text.trim().toLowerCase()), 250); // the database filters: not on every keystroke
    return () => clearTimeout(t);
  }, [text]);
  useEffect(() => {
    navigate(location.pathname + qs({ q: q || null, state: state || null }), true);
  }, [q, state]);
  return { text, setText, q, state, setState };
}

export function InstanceList({ info, user }: { info: InstanceKindInfo; user: Me }) {
  const f = useListFilters();
  const list = useLiveList<Instance>(info.path, info.kind, { q: f.q || null, state: f.state || null },
    (i) => (!f.q || i.name.includes(f.q)) && (!f.state || i.status.vm_state === f.state));
  const tasks = useResourceTasks(info.kind);
  const [creating, setCreating] = useState(false);
  const mayCreate = canWrite(user, "default") || user.roles.some((r) => r.role !== "viewer");
  const filtered = !!(f.q || f.state);
  return (
    <>
      <PageHeader title={info.title}>
        <input type="search" class="list-search" placeholder={`Find ${info.many}…`} aria-label={`Find ${info.many} by name`}
          value={f.text} onInput={(e) => f.setText((e.target as HTMLInputElement).value)} />
        <label class="inline">State{" "}
          <select value={f.state} onChange={(e) => f.setState((e.target as HTMLSelectElement).value)}>
            <option value="">all</option>
            {STATES.map((st) => <option key={st} value={st}>{st}</option>)}
          </select>
        </label>
        {mayCreate && <button type="button" class="primary" onClick={() => setCreating(true)}>Create {info.one}</button>}
      </PageHeader>
      <ErrorBox error={list.error} onRetry={list.reload} />
      {list.loading && list.items.length === 0 && <Loading what={info.title} />}
      {!list.loading && !list.error && list.items.length === 0 && (filtered ? <Empty>No {info.many} match.</Empty> : (
        <Empty>No {info.many} yet.{mayCreate && <> <button type="button" class="link-button" onClick={() => setCreating(true)}>Create one</button>.</>}</Empty>
      ))}
      {list.items.length > 0 && (
        <table class="table instances">
          <thead>
            <tr><th>Name</th><th>Project</th><th>Node</th><th>Power</th><th class="w-state">State</th><th>CPU</th><th>Memory</th><th>IP addresses</th><th>Image</th></tr>
          </thead>
          <tbody>
            {list.items.map((i) => {
              const ips = addressesOf(i);
              return (
                <tr key={i.id}>
                  <td><a href={instanceHref(info, i.name, i.project)}><b>{i.name}</b></a></td>
                  <td>{i.project ?? "—"}</td>
                  <td>{i.status.node ? <a href={`/nodes/${encodeURIComponent(i.status.node)}`}>{i.status.node}</a> : "—"}</td>
                  <td><PowerBadge inst={i} /></td>
                  <td><StateCell inst={i} task={tasks.byResource.get(i.id)} /></td>
                  <td>{i.spec.cpu ?? "—"}</td>
                  <td>{bytes(i.spec.memory_bytes)}</td>
                  <td>{ips.length ? ips.map((a) => <span key={a} class="chip mono">{a}</span>) : "—"}</td>
                  <td>{i.spec.image}</td>
                </tr>
              );
            })}
          </tbody>
        </table>
      )}
      {list.more && <button type="button" onClick={list.loadMore}>Load more</button>}
      {creating && (
        <CreateInstanceDialog info={info} user={user} onClose={() => setCreating(false)}
          onCreated={(inst, task) => {
            tasks.track(task);
            setCreating(false);
            navigate(instanceHref(info, inst.name, inst.project));
          }} />
      )}
    </>
  );
}

function MigrateDialog({ info, inst, onClose, onStarted }: {
  info: InstanceKindInfo; inst: Instance; onClose: () => void; onStarted: (t: Task) => void;
}) {
  const nodes = useFetch<Page<Node>>("nodes?limit=100");
  const targets = (nodes.data?.items ?? []).filter((n) =>
    n.name !== inst.status.node && n.status.phase === "Ready" && n.spec.schedulable !== false);
  const [to, setTo] = useState("");
  const [error, setError] = useState<ApiError | null>(null);
  const [busy, setBusy] = useState(false);
  const target = to || targets[0]?.name || "";
  async function go() {
    setBusy(true);
    setError(null);
    try {
      onStarted(await post<Task>(instancePath(info, inst.name, inst.project ?? "default", "/migrate"), { to: target }));
    } catch (e) {
      setError(asError(e));
    } finally {
      setBusy(false);
    }
  }
  return (
    <Dialog title={`Migrate ${info.one} ${inst.name}`} onClose={onClose}>
      <div class="dialog-body">
        <p class="muted">{info.kind === "vm"
          ? "Live migration: the guest keeps running while its memory moves to the other node."
          : "Containers do not move live: it is stopped here and started again on the other node."}</p>
        <ErrorBox error={nodes.error} />
        {nodes.loading ? <Loading what="nodes" /> : targets.length === 0 ? (
          <p class="notice">There is no other Ready, schedulable node to move it to (now on <b>{inst.status.node ?? "no node"}</b>).</p>
        ) : (
          <label class="field">Target node
            <select value={target} onChange={(e) => setTo((e.target as HTMLSelectElement).value)}>
              {targets.map((n) => <option key={n.id} value={n.name}>{n.name}</option>)}
            </select>
          </label>
        )}
        <ErrorBox error={error} />
      </div>
      <footer class="dialog-footer">
        <button type="button" onClick={onClose}>Cancel</button>
        <button type="button" class="primary" disabled={busy || !target} onClick={go}>Migrate</button>
      </footer>
    </Dialog>
  );
}

const ACTION_LABEL: Record<Action, string> = { start: "Start", stop: "Stop", reboot: "Reboot", pause: "Pause", resume: "Resume" };

function Actions({ info, inst, onTask, onError }: {
  info: InstanceKindInfo; inst: Instance; onTask: (t: Task) => void; onError: (e: ApiError | null) => void;
}) {
  const [asking, setAsking] = useState<"stop" | "delete" | "migrate" | null>(null);
  const [busy, setBusy] = useState(false);
  const project = inst.project ?? "default";

  async function run(fn: () => Promise<Task>, after?: () => void) {
    setBusy(true);
    onError(null);
    try {
      onTask(await fn());
      setAsking(null);
      after?.();
    } catch (e) {
      setAsking(null);
      onError(asError(e));
    } finally {
      setBusy(false);
    }
  }
  const act = (a: Action, query = "") => run(() => post<Task>(instancePath(info, inst.name, project, `/${a}`) + query));

  return (
    <div class="actions" role="group" aria-label={`${info.one} actions`}>
      {(["start", "stop", "reboot", "pause", "resume"] as Action[]).map((a) => (
        <button key={a} type="button" disabled={busy || !canAct(inst, a)}
          onClick={() => (a === "stop" ? setAsking("stop") : act(a))}>{ACTION_LABEL[a]}</button>
      ))}
      <button type="button" disabled={busy || !canAct(inst, "migrate")} onClick={() => setAsking("migrate")}>Migrate…</button>
      <button type="button" class="danger" disabled={busy || !canAct(inst, "delete")} onClick={() => setAsking("delete")}>Delete</button>
      {asking === "stop" && (
        <Dialog title={`Stop ${info.one} ${inst.name}`} onClose={() => setAsking(null)}>
          <div class="dialog-body">
            <p>Shut down asks the {info.kind === "vm" ? "guest" : "process"} to stop and powers it off after 30 s if it has not.
              Power off stops it at once, like pulling the plug.</p>
          </div>
          <footer class="dialog-footer">
            <button type="button" onClick={() => setAsking(null)}>Cancel</button>
            <button type="button" class="danger" disabled={busy} onClick={() => act("stop", "&timeout=0")}>Power off</button>
            <button type="button" class="primary" disabled={busy} onClick={() => act("stop", "&timeout=30")}>Shut down</button>
          </footer>
        </Dialog>
      )}
      {asking === "delete" && (
        <Confirm title={`Delete ${info.one} ${inst.name}?`} confirm="Delete" danger busy={busy} onClose={() => setAsking(null)}
          onConfirm={() => run(() => del<Task>(instancePath(info, inst.name, project)), () => navigate(`/${info.path}`))}>
          <p>This stops it and removes it with the network ports it made. It cannot be undone.</p>
        </Confirm>
      )}
      {asking === "migrate" && (
        <MigrateDialog info={info} inst={inst} onClose={() => setAsking(null)} onStarted={(t) => { onTask(t); setAsking(null); }} />
      )}
    </div>
  );
}

function ConsoleLog({ path }: { path: string }) {
  const [text, setText] = useState<string | null>(null);
  const [error, setError] = useState<ApiError | null>(null);
  const load = () => {
    getText(path).then((t) => { setText(t); setError(null); }).catch((e) => setError(asError(e)));
  };
  useEffect(load, [path]);
  return (
    <section class="section" aria-label="Console log">
      <div class="console-bar"><span class="muted">The last 64 KiB of output</span>
        <button type="button" class="small" onClick={load}>Refresh</button></div>
      <ErrorBox error={error} />
      {text !== null && <pre class="log" data-testid="console-log">{text || "(nothing printed yet)"}</pre>}
    </section>
  );
}

type Tab = "" | "serial" | "vnc" | "tty" | "log";

export function InstanceDetail({ info, name, project, tab, user }: {
  info: InstanceKindInfo; name: string; project: string; tab: string; user: Me;
}) {
  const inst = useFetch<Instance>(instancePath(info, name, project));
  const [live, setLive] = useState<Instance | null>(null);
  const [gone, setGone] = useState(false);
  const [actionError, setActionError] = useState<ApiError | null>(null);
  const tasks = useResourceTasks(info.kind);

  useLive([info.kind], (e) => {
    if (e.name !== name || (e.project ?? "default") !== project) return;
    if (e.verb === "deleted") setGone(true);
    else setLive(e.object as unknown as Instance);
  });

  const i = live ?? inst.data;
  const crumbs = (
    <nav class="crumbs" aria-label="Breadcrumb"><a href={`/${info.path}`}>{info.title}</a> / <span aria-current="page">{name}</span>
      {project !== "default" && <span class="muted"> (project {project})</span>}</nav>
  );
  if (gone) return <>{crumbs}<PageHeader title={name} /><p class="notice">This {info.one} was deleted. <a href={`/${info.path}`}>Back to {info.title}</a></p></>;
  if (inst.error && !i) return <>{crumbs}<PageHeader title={name} /><ErrorBox error={inst.error} onRetry={inst.reload} /></>;
  if (!i) return <>{crumbs}<PageHeader title={name} /><Loading what={info.one} /></>;

  const task = tasks.byResource.get(i.id);
  const writer = canWrite(user, i.project);
  const running = i.status.power_state === "running";
  const tabs: [Tab, string][] = [["", "Summary"]];
  if (info.kind === "vm") tabs.push(["serial", "Serial console"], ["vnc", "VNC console"]);
  else if (i.spec.tty) tabs.push(["tty", "Terminal"]);
  tabs.push(["log", "Log"]);
  const current = (tabs.some(([t]) => t === tab) ? tab : "") as Tab;
  const ports = i.status.ports ?? [];
  const failover = i.status.failover as { from?: string; at?: string } | undefined;
  const socketBase = `${info.path}/${encodeURIComponent(name)}/console`;
  const q = `?project=${encodeURIComponent(project)}`;
  const consoleLabel = (what: string) => `${what} of ${info.one} ${name}`;
  let consoleBody = null;
  if (current === "serial" || current === "vnc" || current === "tty") {
    const kind = current === "vnc" ? "vnc-unix" : "serial-unix";
    if (!writer) consoleBody = <p class="notice">Consoles need the operator role in project <b>{i.project}</b>.</p>;
    else if (!running || !hasConsole(i, kind)) consoleBody = <p class="notice">The console is there while the {info.one} runs: it is {i.status.power_state}.</p>;
    else if (current === "vnc") consoleBody = <VncConsole key={i.status.node} socket={`${socketBase}/vnc${q}`} label={consoleLabel("VNC console")}
      vv={offers("POST /api/v1/vms/{name}/console/vv") ? `${socketBase}/vv${q}` : undefined} />;
    else consoleBody = (
      <TerminalConsole key={i.status.node} label={consoleLabel(current === "tty" ? "Terminal" : "Serial console")}
        socket={`${socketBase}/${current}${q}`} history={instancePath(info, name, project, "/console-log")} />
    );
  }

  return (
    <>
      {crumbs}
      <PageHeader title={i.name}>
        <PowerBadge inst={i} />
        {writer && <Actions info={info} inst={i} onTask={tasks.track} onError={setActionError} />}
      </PageHeader>
      <ErrorBox error={actionError} />
      {task && (
        <section class="card task-card" aria-live="polite" aria-labelledby="task-h">
          <h2 id="task-h">{task.name} <Badge value={task.state} /> <a href="/tasks" class="muted small">all tasks</a></h2>
          <Progress percent={task.state === "succeeded" ? 100 : task.progress?.percent ?? 0} state={task.state} label="Task progress" />
          <p class={task.error ? "error-text" : "muted"}>{task.error ?? task.progress?.message}</p>
        </section>
      )}
      <nav class="tabs" aria-label={`${info.one} views`}>
        {tabs.map(([t, label]) => (
          <a key={t} href={instanceHref(info, name, project, t)} aria-current={t === current ? "page" : undefined}>{label}</a>
        ))}
      </nav>
      {current === "" && (
        <>
          <div class="cards">
            <section class="card" aria-labelledby="conf-h">
              <h2 id="conf-h">Configuration</h2>
              <dl class="kv">
                <div><dt>Project</dt><dd>{i.project}</dd></div>
                <div><dt>Image</dt><dd>{i.spec.image}</dd></div>
                <div><dt>{info.kind === "vm" ? "vCPUs" : "CPU limit"}</dt><dd>{i.spec.cpu}</dd></div>
                <div><dt>Memory</dt><dd>{bytes(i.spec.memory_bytes)}</dd></div>
                {typeof i.spec.qos_class === "string" && <div><dt>QoS class</dt><dd>{i.spec.qos_class}</dd></div>}
                <div><dt>High availability</dt><dd>{i.spec.ha ? <Badge value="HA" tone="info" /> : "no"}</dd></div>
                {info.kind === "container" && (
                  <>
                    <div><dt>Command</dt><dd><code>{i.spec.command?.length ? i.spec.command.join(" ") : "(the image's)"}</code></dd></div>
                    <div><dt>TTY</dt><dd>{i.spec.tty ? "yes" : "no"}</dd></div>
                    <div><dt>Isolation</dt><dd>{i.spec.isolation ?? "container"}</dd></div>
                  </>
                )}
                <div><dt>Security groups</dt><dd>{i.spec.security_groups?.length ? i.spec.security_groups.join(", ") : "default"}</dd></div>
                <div><dt>Created</dt><dd>{when(i.created_at)}</dd></div>
              </dl>
            </section>
            <section class="card" aria-labelledby="state-h">
              <h2 id="state-h">State</h2>
              <dl class="kv">
                <div><dt>Power</dt><dd><PowerBadge inst={i} /></dd></div>
                <div><dt>State</dt><dd><Badge value={i.status.vm_state} tone={STATE_TONE[i.status.vm_state] ?? "muted"} /></dd></div>
                <div><dt>Operation</dt><dd>{i.status.task_state ?? "none"}</dd></div>
                <div><dt>Node</dt><dd>{i.status.node ? <a href={`/nodes/${encodeURIComponent(i.status.node)}`}>{i.status.node}</a> : "not placed"}</dd></div>
                <div><dt>Generation</dt><dd>{i.observed_generation}/{i.generation}</dd></div>
                {i.status.error && <div><dt>Error</dt><dd class="error-text">{i.status.error}</dd></div>}
                {failover && <div><dt>Last failover</dt><dd>from node {failover.from} at {when(failover.at)}</dd></div>}
              </dl>
            </section>
          </div>
          <History path={instancePath(info, name, project)} what={info.kind} />
          {info.kind === "container" && (i.spec.mounts?.length ?? 0) > 0 && (
            <section class="section" aria-labelledby="mounts-h">
              <h2 id="mounts-h">Volumes</h2>
              <table class="table">
                <thead><tr><th>Volume</th><th>Mounted at</th><th>Filesystem</th><th>Access</th></tr></thead>
                <tbody>{i.spec.mounts!.map((m) => (
                  <tr key={m.path}>
                    <td><a href={`/volumes/${encodeURIComponent(m.volume)}${project !== "default" ? `?project=${encodeURIComponent(project)}` : ""}`}>{m.volume}</a></td>
                    <td><code>{m.path}</code></td>
                    <td>{m.fs}</td>
                    <td>{m.readonly ? "read-only" : "read-write"}</td>
                  </tr>
                ))}</tbody>
              </table>
            </section>
          )}
          {info.kind === "vm" && (i.status.volumes?.length ?? 0) > 0 && (
            <section class="section" aria-labelledby="disks-h">
              <h2 id="disks-h">Disks</h2>
              <table class="table">
                <thead><tr><th>Volume</th><th>Role</th><th>Export</th></tr></thead>
                <tbody>{i.status.volumes!.map((d) => (
                  <tr key={d.id ?? d.volume}>
                    <td><a href={`/volumes/${encodeURIComponent(d.volume)}${project !== "default" ? `?project=${encodeURIComponent(project)}` : ""}`}>{d.volume}</a></td>
                    <td>{d.owned ? "root (cloned from the image, deleted with the VM)" : "attached"}</td>
                    <td><code class="small">{d.export ?? "—"}</code></td>
                  </tr>
                ))}</tbody>
              </table>
            </section>
          )}
          <section class="section" aria-labelledby="nics-h">
            <h2 id="nics-h">Network interfaces</h2>
            {ports.length ? (
              <table class="table">
                <thead><tr><th>Port</th><th>Network</th><th>MAC</th><th>Addresses</th></tr></thead>
                <tbody>{ports.map((p) => (
                  <tr key={p.id}><td>{p.name}</td><td>{p.network}</td><td><code>{p.mac}</code></td>
                    <td>{p.ips?.length ? p.ips.map((ip) => <span key={ip.address} class="chip mono">{ip.address}{ip.prefix ? `/${ip.prefix}` : ""}</span>) : "—"}</td></tr>
                ))}</tbody>
              </table>
            ) : <Empty>No network interfaces.</Empty>}
          </section>
          <Conditions conditions={i.conditions} />
        </>
      )}
      {consoleBody}
      {current === "log" && <ConsoleLog path={instancePath(info, name, project, "/console-log")} />}
    </>
  );
}
