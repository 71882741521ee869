import { Fragment, render } from "preact";
import { useEffect, useRef, useState } from "preact/hooks";
import { ApiError, clusterReader, get, logout, me, setOfferedRoutes, setUnauthorizedHandler, type Me } from "./api";
import { connect, disconnect, useLiveState } from "./live";
import { Access } from "./pages/Access";
import { Dashboard } from "./pages/Dashboard";
import { Events } from "./pages/Events";
import { INSTANCE_KINDS } from "./instances";
import { InstanceDetail, InstanceList } from "./pages/Instances";
import { VolumeDetail, VolumeList } from "./pages/Volumes";
import { Cluster } from "./pages/Cluster";
import { ImageList } from "./pages/Images";
import { FloatingIpList, RouterDetail, RouterList } from "./pages/Routers";
import { PoolDetail, PoolList } from "./pages/Storage";
import { Login } from "./pages/Login";
import { NodeDetail, Nodes } from "./pages/Nodes";
import { Resources, type Kind } from "./pages/Resources";
import { Tasks } from "./pages/Tasks";
import { Loading } from "./components/ui";
import { interceptLinks, navigate, usePath } from "./router";
import "./styles.css";

/** Other kinds get a page when (and only when) the API serves them; the menu groups them. */
type Group = "Compute" | "Storage" | "Network";
const OPTIONAL_KINDS: (Kind & { group: Group })[] = [
  { path: "vms", title: "VMs", event: "vm", group: "Compute" },
  { path: "containers", title: "Containers", event: "container", group: "Compute" },
  { path: "images", title: "Images", event: "image", group: "Compute" },
  { path: "placement-groups", title: "Placement groups", event: "placement-group", group: "Compute" },
  { path: "pools", title: "Storage pools", event: "storage-pool", group: "Storage" },
  { path: "volumes", title: "Volumes", event: "volume", group: "Storage" },
  { path: "snapshots", title: "Snapshots", event: "snapshot", group: "Storage" },
  { path: "networks", title: "Networks", event: "network", group: "Network" },
  { path: "subnets", title: "Subnets", event: "subnet", group: "Network" },
  { path: "ports", title: "Ports", event: "port", group: "Network" },
  { path: "security-groups", title: "Security groups", event: "security-group", group: "Network" },
  { path: "routers", title: "Routers", event: "router", group: "Network" },
  { path: "floating-ips", title: "Floating IPs", event: "floating-ip", group: "Network" },
];
const GROUPS: Group[] = ["Compute", "Storage", "Network"];

interface Offered { kinds: (Kind & { group: Group })[]; cluster: boolean }

async function offered(): Promise<Offered> {
  try {
    const schema = await get<{ paths: Record<string, Record<string, unknown>> }>("/api/v1/openapi.json");
    setOfferedRoutes(schema.paths);
    return { kinds: OPTIONAL_KINDS.filter((k) => schema.paths[`/api/v1/${k.path}`]?.get),
      cluster: !!schema.paths["/api/v1/cluster"]?.get };
  } catch {
    return { kinds: [], cluster: false };
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
  const [offer, setOffer] = useState<Offered | null>(null); // null until the OpenAPI schema is read
  const kinds = offer?.kinds ?? [];
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
    offered().then(setOffer);
    return () => disconnect();
  }, [user]);

  if (!checked) return <p class="loading">Loading…</p>;
  if (!user) {
    return <Login notice={notice} onLoggedIn={(u) => { setNotice(undefined); setUser(u); if (path.startsWith("/login")) navigate("/", true); }} />;
  }

  const segments = pathname.split("/").filter(Boolean).map(decodeURIComponent);
  const project = new URLSearchParams(location.search).get("project") || "default";
  const one = segments.length === 1;
  const two = segments.length === 2;
  let page;
  if (segments.length === 0) page = <Dashboard user={user} />;
  else if (segments[0] === "nodes" && one) page = <Nodes user={user} />;
  else if (segments[0] === "nodes" && two) page = <NodeDetail key={segments[1]} name={segments[1]} user={user} />;
  else if (segments[0] === "cluster" && one && offer?.cluster) page = <Cluster user={user} />;
  else if (segments[0] === "tasks") page = <Tasks key={path} user={user} />;
  else if (segments[0] === "events") page = <Events />;
  else if (segments[0] === "access") page = <Access user={user} />;
  else {
    const kind = kinds.find((k) => k.path === segments[0]);
    const instances = kind && (kind.path === "vms" || kind.path === "containers") ? INSTANCE_KINDS[kind.path] : null;
    if (kind?.path === "volumes" && one) page = <VolumeList user={user} />;
    else if (kind?.path === "volumes" && two) {
      page = <VolumeDetail key={`${project}/${segments[1]}`} name={segments[1]} project={project} user={user} />;
    } else if (kind?.path === "pools" && one) page = <PoolList />;
    else if (kind?.path === "pools" && two) page = <PoolDetail key={segments[1]} name={segments[1]} />;
    else if (kind?.path === "images" && one) page = <ImageList user={user} />;
    else if (kind?.path === "routers" && one) page = <RouterList user={user} />;
    else if (kind?.path === "routers" && two) {
      page = <RouterDetail key={`${project}/${segments[1]}`} name={segments[1]} project={project} user={user} />;
    } else if (kind?.path === "floating-ips" && one) page = <FloatingIpList user={user} />;
    else if (instances && one) page = <InstanceList key={kind!.path} info={instances} user={user} />;
    else if (instances && segments.length <= 3) {
      page = <InstanceDetail key={`${kind!.path}/${project}/${segments[1]}`} info={instances} name={segments[1]}
        project={project} tab={segments[2] ?? ""} user={user} />;
    } else page = kind ? <Resources key={kind.path} kind={kind} />
      : offer === null ? <Loading what="the page" />
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
            {clusterReader(user) && offer?.cluster && <NavLink href="/cluster" path={path}>Cluster</NavLink>}
            {clusterReader(user) && <NavLink href="/nodes" path={path}>Nodes</NavLink>}
            <NavLink href="/tasks" path={path}>Tasks</NavLink>
            <NavLink href="/events" path={path}>Events</NavLink>
            <NavLink href="/access" path={path}>Users & projects</NavLink>
          </ul>
          {GROUPS.map((g) => {
            const mine = kinds.filter((k) => k.group === g);
            return mine.length > 0 && (
              <Fragment key={g}>
                <h2 class="nav-heading">{g}</h2>
                <ul>{mine.map((k) => <NavLink key={k.path} href={`/${k.path}`} path={path}>{k.title}</NavLink>)}</ul>
              </Fragment>
            );
          })}
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
