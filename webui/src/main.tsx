import { render } from "preact";
import { useEffect, useRef, useState } from "preact/hooks";
import { ApiError, clusterReader, get, logout, me, setUnauthorizedHandler, type Me } from "./api";
import { connect, disconnect, useLiveState } from "./live";
import { Access } from "./pages/Access";
import { Dashboard } from "./pages/Dashboard";
import { Events } from "./pages/Events";
import { INSTANCE_KINDS } from "./instances";
import { InstanceDetail, InstanceList } from "./pages/Instances";
import { VolumeDetail, VolumeList } from "./pages/Volumes";
import { Login } from "./pages/Login";
import { NodeDetail, Nodes } from "./pages/Nodes";
import { Resources, type Kind } from "./pages/Resources";
import { Tasks } from "./pages/Tasks";
import { Loading } from "./components/ui";
import { interceptLinks, navigate, usePath } from "./router";
import "./styles.css";

/** Other kinds get a read-only list when (and only when) the API serves them. */
const OPTIONAL_KINDS: Kind[] = [
  { path: "vms", title: "VMs", event: "vm" },
  { path: "containers", title: "Containers", event: "container" },
  { path: "images", title: "Images", event: "image" },
  { path: "volumes", title: "Volumes", event: "volume" },
  { path: "snapshots", title: "Snapshots", event: "snapshot" },
  { path: "networks", title: "Networks", event: "network" },
  { path: "subnets", title: "Subnets", event: "subnet" },
  { path: "ports", title: "Ports", event: "port" },
  { path: "security-groups", title: "Security groups", event: "security-group" },
  { path: "placement-groups", title: "Placement groups", event: "placement-group" },
];

async function offeredKinds(): Promise<Kind[]> {
  try {
    const schema = await get<{ paths: Record<string, Record<string, unknown>> }>("/api/v1/openapi.json");
    return OPTIONAL_KINDS.filter((k) => schema.paths[`/api/v1/${k.path}`]?.get);
  } catch {
    return [];
  }
}

function LiveIndicator() {
  const s = useLiveState();
  const text = s === "live" ? "Live" : s === "closed" ? "Offline" : s === "connecting" ? "Connecting" : "Reconnecting";
  return <span class={`live live-${s}`} role="status" title="Server-sent events stream"><i aria-hidden="true" />{text}</span>;
}

function NavLink({ href, path, children }: { href: string; path: string; children: string }) {
  const here = path.split("?")[0];
  const active = href === "/" ? here === "/" : here === href || here.startsWith(`${href}/`);
  return <li><a href={href} aria-current={active ? "page" : undefined}>{children}</a></li>;
}

function App() {
  const path = usePath();
  const [user, setUser] = useState<Me | null>(null);
  const [checked, setChecked] = useState(false);
  const [notice, setNotice] = useState<string | undefined>();
  const [offered, setKinds] = useState<Kind[] | null>(null); // null until the OpenAPI schema is read
  const kinds = offered ?? [];
  const pathname = path.split("?")[0];
  const firstPath = useRef(pathname);

  // After client-side navigation, move focus to the new page (screen readers announce it).
  useEffect(() => {
    if (pathname !== firstPath.current) document.getElementById("main")?.focus({ preventScroll: true });
    firstPath.current = "";
  }, [pathname]);

  useEffect(() => {
    setUnauthorizedHandler(() => {
      disconnect();
      setUser((u) => {
        if (u) setNotice("Your session has ended: sign in again.");
        return null;
      });
    });
    me().then(setUser).catch((e) => {
      if (!(e instanceof ApiError && e.status === 401)) setNotice(e.message);
    }).finally(() => setChecked(true));
  }, []);

  useEffect(() => {
    if (!user) return;
    connect(() => me().catch(() => undefined));
    offeredKinds().then(setKinds);
    return () => disconnect();
  }, [user]);

  if (!checked) return <p class="loading">Loading…</p>;
  if (!user) {
    return <Login notice={notice} onLoggedIn={(u) => { setNotice(undefined); setUser(u); if (path.startsWith("/login")) navigate("/", true); }} />;
  }

  const segments = pathname.split("/").filter(Boolean).map(decodeURIComponent);
  let page;
  if (segments.length === 0) page = <Dashboard user={user} />;
  else if (segments[0] === "nodes" && segments.length === 1) page = <Nodes />;
  else if (segments[0] === "nodes" && segments.length === 2) page = <NodeDetail key={segments[1]} name={segments[1]} user={user} />;
  else if (segments[0] === "tasks") page = <Tasks key={path} user={user} />;
  else if (segments[0] === "events") page = <Events />;
  else if (segments[0] === "access") page = <Access user={user} />;
  else {
    const kind = kinds.find((k) => k.path === segments[0]);
    const instances = kind && (kind.path === "vms" || kind.path === "containers") ? INSTANCE_KINDS[kind.path] : null;
    const project = new URLSearchParams(location.search).get("project") || "default";
    if (kind?.path === "volumes" && segments.length === 1) page = <VolumeList user={user} />;
    else if (kind?.path === "volumes" && segments.length === 2) {
      page = <VolumeDetail key={`${project}/${segments[1]}`} name={segments[1]} project={project} user={user} />;
    } else if (instances && segments.length === 1) page = <InstanceList key={kind!.path} info={instances} user={user} />;
    else if (instances && segments.length <= 3) {
      page = <InstanceDetail key={`${kind!.path}/${project}/${segments[1]}`} info={instances} name={segments[1]}
        project={project} tab={segments[2] ?? ""} user={user} />;
    } else page = kind ? <Resources key={kind.path} kind={kind} />
      : offered === null ? <Loading what="the page" />
      : <><h1>Not found</h1><p>There is no page at <code>{pathname}</code>. <a href="/">Go to the dashboard</a>.</p></>;
  }

  return (
    <div class="shell">
      <a class="skip" href="#main">Skip to content</a>
      <aside class="sidebar">
        <a class="brand" href="/"><img src="/favicon.svg" alt="" width="28" height="28" /> Cairn</a>
        <nav aria-label="Main">
          <ul>
            <NavLink href="/" path={path}>Dashboard</NavLink>
            {clusterReader(user) && <NavLink href="/nodes" path={path}>Nodes</NavLink>}
            <NavLink href="/tasks" path={path}>Tasks</NavLink>
            <NavLink href="/events" path={path}>Events</NavLink>
            <NavLink href="/access" path={path}>Users & projects</NavLink>
          </ul>
          {kinds.length > 0 && (
            <>
              <h2 class="nav-heading">Resources</h2>
              <ul>{kinds.map((k) => <NavLink key={k.path} href={`/${k.path}`} path={path}>{k.title}</NavLink>)}</ul>
            </>
          )}
        </nav>
      </aside>
      <div class="main-col">
        <header class="topbar">
          <LiveIndicator />
          <span class="user">Signed in as <b>{user.name}</b>{user.cluster_role && <> ({user.cluster_role})</>}</span>
          <button type="button" class="small" onClick={async () => {
            disconnect();
            await logout().catch(() => undefined);
            setUser(null);
            navigate("/", true);
          }}>Sign out</button>
        </header>
        <main id="main" tabIndex={-1}>{page}</main>
      </div>
    </div>
  );
}

const root = document.getElementById("app")!;
interceptLinks(root);
render(<App />, root);
