/** Routers (their networks and port forwards) and floating IPs. */

import { useState } from "preact/hooks";
import {
  canWrite, del, post, qs, type FloatingIp, type Me, type Network, type Page, type Resource, type Router,
} from "../api";
import { Confirm, Dialog } from "../components/dialog";
import { Badge, Conditions, Empty, ErrorBox, Loading, PageHeader } from "../components/ui";
import { when } from "../format";
import { useAction, useFetch, useLiveList, type ActionState } from "../hooks";
import { useLive } from "../live";
import { navigate } from "../router";

const PHASE_TONE: Record<string, string> = { Active: "ok", Pending: "info", Error: "bad" };
type Port = Resource<{ network?: string }, { ips?: { address: string }[]; mac?: string; device?: string | null }>;

function routerPath(name: string, project: string, sub = ""): string {
  return `routers/${encodeURIComponent(name)}${sub}${qs({ project })}`;
}

export function routerHref(name: string, project: string | null): string {
  return `/routers/${encodeURIComponent(name)}${project && project !== "default" ? qs({ project }) : ""}`;
}

function Phase({ status }: { status: { phase?: string; message?: string } }) {
  const phase = status.phase ?? "Pending";
  return <Badge value={phase} tone={PHASE_TONE[phase] ?? "muted"} />;
}

/** Projects the user may create things in (a select's options). */
function useWritableProjects(user: Me): string[] {
  const projects = useFetch<Page<Resource>>("projects?limit=100");
  const names = (projects.data?.items ?? []).map((p) => p.name).filter((p) => canWrite(user, p));
  return names.length ? names : ["default"];
}

function ProjectField({ user, value, onChange }: { user: Me; value: string; onChange: (p: string) => void }) {
  const projects = useWritableProjects(user);
  return (
    <label class="field">Project
      <select name="project" value={value} onChange={(e) => onChange((e.target as HTMLSelectElement).value)}>
        {projects.map((p) => <option key={p} value={p}>{p}</option>)}
      </select>
    </label>
  );
}

function DialogFooter({ action, onClose, submit }: { action: ActionState; onClose: () => void; submit: string }) {
  return (
    <>
      <div class="dialog-errors"><ErrorBox error={action.error} /></div>
      <footer class="dialog-footer">
        <button type="button" onClick={onClose}>Cancel</button>
        <button type="submit" class="primary" disabled={action.busy}>{submit}</button>
      </footer>
    </>
  );
}

const NAME_PATTERN = "[a-z0-9]([a-z0-9\\-]*[a-z0-9])?";

function CreateRouterDialog({ user, onClose }: { user: Me; onClose: () => void }) {
  const [name, setName] = useState("");
  const [project, setProject] = useState("default");
  const [external, setExternal] = useState(true);
  const [nets, setNets] = useState<string[]>([]);
  const networks = useFetch<Page<Network>>(`networks${qs({ project, limit: 100 })}`);
  const action = useAction();
  async function submit(e: Event) {
    e.preventDefault();
    const r = await action.run(() => post<Router>("routers", { name: name.trim(), project, spec: { external, networks: nets } }));
    if (r) navigate(routerHref(r.name, r.project));
  }
  return (
    <Dialog title="Create router" onClose={onClose} wide>
      <form onSubmit={submit}>
        <div class="dialog-body form-grid">
          <label class="field">Name
            <input name="name" required maxLength={63} pattern={NAME_PATTERN} value={name} onInput={(e) => setName((e.target as HTMLInputElement).value)} />
          </label>
          <ProjectField user={user} value={project} onChange={(p) => { setProject(p); setNets([]); }} />
          <fieldset class="field checklist span2">
            <legend>Networks to route</legend>
            {(networks.data?.items ?? []).length === 0 ? <p class="hint">{networks.loading ? "Loading…" : `No networks in project ${project}.`}</p>
              : networks.data!.items.map((n) => (
                <label key={n.id} class="check">
                  <input type="checkbox" checked={nets.includes(n.name)}
                    onChange={(e) => setNets((e.target as HTMLInputElement).checked ? [...nets, n.name] : nets.filter((x) => x !== n.name))} />
                  {n.name} {n.spec.cidr && <span class="muted mono">{n.spec.cidr}</span>}
                </label>
              ))}
          </fieldset>
          <label class="check span2">
            <input type="checkbox" name="external" checked={external} onChange={(e) => setExternal((e.target as HTMLInputElement).checked)} />
            External address (egress NAT, port forwards and floating IPs)
          </label>
        </div>
        <DialogFooter action={action} onClose={onClose} submit="Create router" />
      </form>
    </Dialog>
  );
}

export function RouterList({ user }: { user: Me }) {
  const list = useLiveList<Router>("routers", "router");
  const [creating, setCreating] = useState(false);
  const mayCreate = canWrite(user, "default") || user.roles.some((r) => r.role !== "viewer");
  return (
    <>
      <PageHeader title="Routers">
        {mayCreate && <button type="button" class="primary" onClick={() => setCreating(true)}>Create router</button>}
      </PageHeader>
      <ErrorBox error={list.error} onRetry={list.reload} />
      {list.loading && list.items.length === 0 && <Loading what="routers" />}
      {!list.loading && !list.error && list.items.length === 0 && <Empty>No routers yet: a router gives networks egress and port forwards.</Empty>}
      {list.items.length > 0 && (
        <table class="table">
          <thead><tr><th>Name</th><th>Project</th><th>State</th><th>External address</th><th>Node</th><th>Networks</th><th>Port forwards</th></tr></thead>
          <tbody>{list.items.map((r) => (
            <tr key={r.id}>
              <td><a href={routerHref(r.name, r.project)}><b>{r.name}</b></a></td>
              <td>{r.project ?? "—"}</td>
              <td><Phase status={r.status} /></td>
              <td class="mono">{r.status.external_address ?? "—"}</td>
              <td>{r.status.node ?? "—"}</td>
              <td>{(r.spec.interfaces ?? []).map((i) => <span key={i.subnet} class="chip">{i.network} <span class="mono">{i.cidr}</span></span>)}</td>
              <td>{r.spec.port_forwards?.length ?? 0}</td>
            </tr>
          ))}</tbody>
        </table>
      )}
      {list.more && <button type="button" onClick={list.loadMore}>Load more</button>}
      {creating && <CreateRouterDialog user={user} onClose={() => setCreating(false)} />}
    </>
  );
}

function ForwardDialog({ router, onClose, onDone }: { router: Router; onClose: () => void; onDone: (r: Router) => void }) {
  const project = router.project ?? "default";
  const ports = useFetch<Page<Port>>(`ports${qs({ project, limit: 500 })}`);
  const routed = new Set((router.spec.interfaces ?? []).map((i) => i.network));
  const targets = (ports.data?.items ?? []).filter((p) => routed.has(p.spec.network ?? ""));
  const [protocol, setProtocol] = useState("tcp");
  const [externalPort, setExternalPort] = useState("");
  const [port, setPort] = useState("");
  const [address, setAddress] = useState("");
  const [internalPort, setInternalPort] = useState("");
  const action = useAction();
  const chosen = port || (address ? "" : targets[0]?.name ?? "");
  async function submit(e: Event) {
    e.preventDefault();
    const body: Record<string, unknown> = { protocol, external_port: Number(externalPort) };
    if (internalPort) body.internal_port = Number(internalPort);
    if (address) body.internal_address = address.trim();
    else body.port = chosen;
    const r = await action.run(() => post<Router>(routerPath(router.name, project, "/port-forwards"), body));
    if (r) onDone(r);
  }
  return (
    <Dialog title={`Port forward on ${router.name}`} onClose={onClose} wide>
      <form onSubmit={submit}>
        <div class="dialog-body form-grid">
          <p class="hint span2">Connections to <b class="mono">{router.status.external_address ?? "the router's external address"}</b>:external port
            reach the target's internal port.</p>
          <label class="field">Protocol
            <select name="protocol" value={protocol} onChange={(e) => setProtocol((e.target as HTMLSelectElement).value)}>
              <option value="tcp">TCP</option><option value="udp">UDP</option>
            </select>
          </label>
          <label class="field">External port
            <input name="external_port" type="number" required min={1} max={65535} value={externalPort}
              onInput={(e) => setExternalPort((e.target as HTMLInputElement).value)} />
          </label>
          <label class="field">Target port (an instance's interface)
            <select name="port" value={chosen} disabled={!!address} onChange={(e) => setPort((e.target as HTMLSelectElement).value)}>
              {targets.length === 0 && <option value="">{ports.loading ? "loading…" : "no ports on the routed networks"}</option>}
              {targets.map((p) => <option key={p.id} value={p.name}>{p.name} ({(p.status.ips ?? []).map((ip) => ip.address).join(", ") || p.spec.network})</option>)}
            </select>
          </label>
          <label class="field">or an address
            <input name="internal_address" class="mono" placeholder="10.0.0.5" value={address} onInput={(e) => setAddress((e.target as HTMLInputElement).value)} />
          </label>
          <label class="field">Internal port
            <input name="internal_port" type="number" min={1} max={65535} placeholder="the external port" value={internalPort}
              onInput={(e) => setInternalPort((e.target as HTMLInputElement).value)} />
          </label>
        </div>
        <DialogFooter action={action} onClose={onClose} submit="Add port forward" />
      </form>
    </Dialog>
  );
}

function InterfaceDialog({ router, onClose, onDone }: { router: Router; onClose: () => void; onDone: (r: Router) => void }) {
  const project = router.project ?? "default";
  const networks = useFetch<Page<Network>>(`networks${qs({ project, limit: 100 })}`);
  const attached = new Set((router.spec.interfaces ?? []).map((i) => i.network));
  const free = (networks.data?.items ?? []).filter((n) => !attached.has(n.name));
  const [network, setNetwork] = useState("");
  const action = useAction();
  const chosen = network || free[0]?.name || "";
  async function submit(e: Event) {
    e.preventDefault();
    const r = await action.run(() => post<Router>(routerPath(router.name, project, "/add-interface"), { network: chosen }));
    if (r) onDone(r);
  }
  return (
    <Dialog title={`Route a network through ${router.name}`} onClose={onClose}>
      <form onSubmit={submit}>
        <div class="dialog-body">
          <label class="field">Network
            <select name="network" value={chosen} onChange={(e) => setNetwork((e.target as HTMLSelectElement).value)}>
              {free.length === 0 && <option value="">{networks.loading ? "loading…" : "no other networks"}</option>}
              {free.map((n) => <option key={n.id} value={n.name}>{n.name} {n.spec.cidr ?? ""}</option>)}
            </select>
          </label>
        </div>
        <DialogFooter action={action} onClose={onClose} submit="Add interface" />
      </form>
    </Dialog>
  );
}

type Asking = "forward" | "interface" | "delete" | null;

export function RouterDetail({ name, project, user }: { name: string; project: string; user: Me }) {
  const router = useFetch<Router>(routerPath(name, project));
  const [live, setLive] = useState<Router | null>(null);
  const [asking, setAsking] = useState<Asking>(null);
  const action = useAction();
  useLive(["router"], (e) => {
    if (e.name === name && (e.project ?? "default") === project && e.verb !== "deleted") setLive(e.object as unknown as Router);
  });
  const crumbs = <nav class="crumbs" aria-label="Breadcrumb"><a href="/routers">Routers</a> / <span aria-current="page">{name}</span></nav>;
  const r = live ?? router.data;
  if (!r) return <>{crumbs}<PageHeader title={name} /><ErrorBox error={router.error} onRetry={router.reload} />{router.loading && <Loading what="the router" />}</>;
  const writer = canWrite(user, r.project);
  const forwards = r.spec.port_forwards ?? [];
  const done = (x: Router) => { setLive(x); setAsking(null); };
  return (
    <>
      {crumbs}
      <PageHeader title={r.name}>
        <Phase status={r.status} />
        {writer && (
          <div class="actions" role="group" aria-label="Router actions">
            <button type="button" disabled={!r.status.external_address} title={r.status.external_address ? "" : "the router has no external address"}
              onClick={() => setAsking("forward")}>Add port forward…</button>
            <button type="button" onClick={() => setAsking("interface")}>Add network…</button>
            <button type="button" class="danger" onClick={() => setAsking("delete")}>Delete</button>
          </div>
        )}
      </PageHeader>
      {r.status.message && r.status.phase === "Error" && <ErrorBox error={String(r.status.message)} />}
      <ErrorBox error={action.error} />
      <div class="cards">
        <section class="card" aria-labelledby="router-h">
          <h2 id="router-h">Router</h2>
          <dl class="kv">
            <div><dt>Project</dt><dd>{r.project}</dd></div>
            <div><dt>External address</dt><dd class="mono">{r.status.external_address ?? "none (routes between its networks only)"}</dd></div>
            <div><dt>Node</dt><dd>{r.status.node ?? "—"}</dd></div>
            {r.spec.description && <div><dt>Description</dt><dd>{r.spec.description}</dd></div>}
            <div><dt>Created</dt><dd>{when(r.created_at)}</dd></div>
          </dl>
        </section>
      </div>
      <section class="section" aria-labelledby="ifaces-h">
        <h2 id="ifaces-h">Networks</h2>
        {(r.spec.interfaces ?? []).length === 0 ? <Empty>No networks routed yet.</Empty> : (
          <table class="table">
            <thead><tr><th>Network</th><th>Subnet</th><th>CIDR</th><th>Gateway</th>{writer && <th><span class="sr-only">Actions</span></th>}</tr></thead>
            <tbody>{r.spec.interfaces!.map((i) => (
              <tr key={i.subnet}><td>{i.network}</td><td>{i.subnet}</td><td class="mono">{i.cidr}</td><td class="mono">{i.gateway}</td>
                {writer && <td class="row-actions"><button type="button" class="small danger" disabled={action.busy}
                  onClick={async () => { const x = await action.run(() => post<Router>(routerPath(name, project, "/remove-interface"), { subnet: i.subnet })); if (x) setLive(x); }}>Remove</button></td>}
              </tr>
            ))}</tbody>
          </table>
        )}
      </section>
      <section class="section" aria-labelledby="forwards-h">
        <h2 id="forwards-h">Port forwards</h2>
        {forwards.length === 0 ? <Empty>No port forwards.</Empty> : (
          <table class="table">
            <thead><tr><th>Protocol</th><th>External</th><th>Target</th><th>Port</th>{writer && <th><span class="sr-only">Actions</span></th>}</tr></thead>
            <tbody>{forwards.map((f) => (
              <tr key={f.id}>
                <td>{f.protocol.toUpperCase()}</td>
                <td class="mono">{r.status.external_address ?? "?"}:{f.external_port}</td>
                <td class="mono">{f.internal_address}:{f.internal_port}</td>
                <td>{f.port ?? "—"}</td>
                {writer && <td class="row-actions"><button type="button" class="small danger" disabled={action.busy}
                  onClick={async () => { const x = await action.run(() => del<Router>(routerPath(name, project, `/port-forwards/${encodeURIComponent(f.id)}`))); if (x) setLive(x); }}>Remove</button></td>}
              </tr>
            ))}</tbody>
          </table>
        )}
      </section>
      <Conditions conditions={r.conditions} />
      {asking === "forward" && <ForwardDialog router={r} onClose={() => setAsking(null)} onDone={done} />}
      {asking === "interface" && <InterfaceDialog router={r} onClose={() => setAsking(null)} onDone={done} />}
      {asking === "delete" && (
        <Confirm title={`Delete router ${r.name}?`} confirm="Delete" danger busy={action.busy} onClose={() => setAsking(null)}
          onConfirm={async () => {
            setAsking(null);
            if (await action.run(async () => { await del(routerPath(name, project)); return true; })) navigate("/routers");
          }}>
          <p>Its networks lose egress and its port forwards stop. Floating IPs through it must be disassociated first.</p>
        </Confirm>
      )}
    </>
  );
}

function FloatingIpDialog({ user, fip, onClose }: { user: Me; fip?: FloatingIp; onClose: () => void }) {
  const [name, setName] = useState("");
  const [project, setProject] = useState(fip?.project ?? "default");
  const ports = useFetch<Page<Port>>(`ports${qs({ project, limit: 500 })}`);
  const [port, setPort] = useState("");
  const action = useAction();
  async function submit(e: Event) {
    e.preventDefault();
    const ok = fip
      ? await action.run(() => post(`floating-ips/${encodeURIComponent(fip.name)}/associate${qs({ project })}`, { port }))
      : await action.run(() => post("floating-ips", { name: name.trim(), project, spec: port ? { port } : {} }));
    if (ok) onClose();
  }
  return (
    <Dialog title={fip ? `Associate ${fip.name}` : "Allocate floating IP"} onClose={onClose}>
      <form onSubmit={submit}>
        <div class="dialog-body form-grid one">
          {!fip && (
            <>
              <label class="field">Name
                <input name="name" required maxLength={63} pattern={NAME_PATTERN} value={name} onInput={(e) => setName((e.target as HTMLInputElement).value)} />
              </label>
              <ProjectField user={user} value={project} onChange={setProject} />
            </>
          )}
          <label class="field">Port (an instance's interface)
            <select name="port" value={port} required={!!fip} onChange={(e) => setPort((e.target as HTMLSelectElement).value)}>
              <option value="">{fip ? "choose a port" : "none yet"}</option>
              {(ports.data?.items ?? []).map((p) => <option key={p.id} value={p.name}>{p.name} ({(p.status.ips ?? []).map((ip) => ip.address).join(", ") || p.spec.network})</option>)}
            </select>
          </label>
        </div>
        <DialogFooter action={action} onClose={onClose} submit={fip ? "Associate" : "Allocate"} />
      </form>
    </Dialog>
  );
}

export function FloatingIpList({ user }: { user: Me }) {
  const list = useLiveList<FloatingIp>("floating-ips", "floating-ip");
  const [asking, setAsking] = useState<{ what: "create" } | { what: "associate" | "delete"; fip: FloatingIp } | null>(null);
  const action = useAction();
  const mayCreate = canWrite(user, "default") || user.roles.some((r) => r.role !== "viewer");
  const fipPath = (f: FloatingIp, sub = "") => `floating-ips/${encodeURIComponent(f.name)}${sub}${qs({ project: f.project })}`;
  return (
    <>
      <PageHeader title="Floating IPs">
        {mayCreate && <button type="button" class="primary" onClick={() => setAsking({ what: "create" })}>Allocate floating IP</button>}
      </PageHeader>
      <ErrorBox error={list.error} onRetry={list.reload} />
      <ErrorBox error={action.error} />
      {list.loading && list.items.length === 0 && <Loading what="floating IPs" />}
      {!list.loading && !list.error && list.items.length === 0 && <Empty>No floating IPs: one gives an instance's port an external address.</Empty>}
      {list.items.length > 0 && (
        <table class="table">
          <thead><tr><th>Name</th><th>Project</th><th>Address</th><th>Port</th><th>Fixed address</th><th>Router</th><th><span class="sr-only">Actions</span></th></tr></thead>
          <tbody>{list.items.map((f) => (
            <tr key={f.id}>
              <td><b>{f.name}</b></td>
              <td>{f.project ?? "—"}</td>
              <td class="mono">{f.status.address ?? "—"}</td>
              <td>{f.spec.port ?? <span class="muted">not associated</span>}</td>
              <td class="mono">{f.status.fixed_address ?? "—"}</td>
              <td>{f.status.router ? <a href={routerHref(String(f.status.router), f.project)}>{String(f.status.router)}</a> : "—"}</td>
              <td class="row-actions">{canWrite(user, f.project) && (
                <>
                  {f.spec.port
                    ? <button type="button" class="small" disabled={action.busy} onClick={() => action.run(() => post(fipPath(f, "/disassociate")))}>Disassociate</button>
                    : <button type="button" class="small" disabled={action.busy} onClick={() => setAsking({ what: "associate", fip: f })}>Associate…</button>}
                  <button type="button" class="small danger" disabled={action.busy} onClick={() => setAsking({ what: "delete", fip: f })}>Release</button>
                </>
              )}</td>
            </tr>
          ))}</tbody>
        </table>
      )}
      {list.more && <button type="button" onClick={list.loadMore}>Load more</button>}
      {asking?.what === "create" && <FloatingIpDialog user={user} onClose={() => setAsking(null)} />}
      {asking?.what === "associate" && <FloatingIpDialog user={user} fip={asking.fip} onClose={() => setAsking(null)} />}
      {asking?.what === "delete" && (
        <Confirm title={`Release ${asking.fip.name}?`} confirm="Release" danger busy={action.busy} onClose={() => setAsking(null)}
          onConfirm={() => { const f = asking.fip; setAsking(null); action.run(() => del(fipPath(f))); }}>
          <p>Its address {asking.fip.status.address} goes back to the external pool.</p>
        </Confirm>
      )}
    </>
  );
}
