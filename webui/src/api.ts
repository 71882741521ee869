/** The REST API client: JSON in/out, CSRF header on unsafe requests, problem+json errors. */

export const API = "/api/v1";

export interface Condition {
  type: string;
  status: string;
  reason: string;
  message: string;
  last_transition_time: string | null;
}

export interface Resource<S = Record<string, unknown>, St = Record<string, unknown>> {
  id: string;
  name: string;
  project: string | null;
  spec: S;
  status: St;
  generation: number;
  observed_generation: number;
  conditions: Condition[];
  created_at: string | null;
  updated_at: string | null;
}

export interface Disk { name: string; size_bytes: number; model: string; rotational: boolean }
export interface Nic { name: string; mac: string; mtu: number; speed_mbps: number | null; addresses: string[] }
export interface Inventory {
  cpu_model: string;
  cores: number;
  threads: number;
  numa_nodes: number;
  memory_bytes: number;
  disks: Disk[];
  nics: Nic[];
  virt_type: string;
  kernel: string;
  [extra: string]: unknown;
}
export interface NodeStatus {
  phase: "Ready" | "NotReady" | "Fenced" | "Maintenance";
  last_heartbeat: string | null;
  inventory?: Partial<Inventory>;
  allocatable?: { cpu?: number; memory_bytes?: number };
  [extra: string]: unknown;
}
export type Node = Resource<{ schedulable?: boolean; labels?: Record<string, string> }, NodeStatus>;

export type TaskState = "pending" | "running" | "succeeded" | "failed" | "cancelled";
export const TASK_STATES: TaskState[] = ["pending", "running", "succeeded", "failed", "cancelled"];
export interface Task {
  id: string;
  name: string;
  project: string | null;
  state: TaskState;
  progress: { percent: number; message: string };
  error: string | null;
  result?: Record<string, unknown> | null;
  resource: { kind: string; name: string; id: string } | null;
  attempts: number;
  created_at: string | null;
  started_at: string | null;
  finished_at: string | null;
}

/** VMs and containers share one shape (DESIGN.md, Compute). */
export type InstanceKind = "vm" | "container";
export interface PortIp { subnet: string; address: string; prefix?: number; gateway?: string | null }
export interface AttachedPort { id: string; name: string; mac: string; network: string; ips: PortIp[]; mtu?: number | null }
export interface InstanceSpec {
  cpu: number;
  memory_bytes: number;
  image: string;
  networks?: string[];
  security_groups?: string[];
  power?: string;
  command?: string[];
  tty?: boolean;
  isolation?: "container" | "vm";
  mounts?: { volume: string; path: string; fs: string; readonly: boolean }[];
  ha?: boolean;
  [extra: string]: unknown;
}
export interface InstanceStatus {
  vm_state: string;
  task_state: string | null;
  power_state: string;
  node?: string;
  ports?: AttachedPort[];
  volumes?: { volume: string; id?: string; export?: string; owned?: boolean }[];
  consoles?: { kind: string }[];
  error?: string | null;
  [extra: string]: unknown;
}
export type Instance = Resource<InstanceSpec, InstanceStatus>;
export type Image = Resource<{ kind: InstanceKind; format: string; [extra: string]: unknown }, { phase?: string }>;
export type Volume = Resource<
  { pool?: string; class?: string; size_bytes?: number; labels?: Record<string, string> },
  { phase?: string; message?: string; export?: string; size_bytes?: number; class?: string; task_state?: string | null }
>;
export interface VolumeSnapshot { id?: string; name: string; volume: string; size_bytes: number; created_at: string | null }
export type Network = Resource<{ cidr?: string | null; mtu?: number }, { phase?: string; vni?: number }>;

export interface PoolStats {
  logical_bytes?: number;
  stored_bytes?: number;
  unique_bytes?: number;
  dedup_ratio?: number;
  compression_ratio?: number;
  volumes?: number;
  backend_bytes?: number;
}
export type Pool = Resource<
  { backend?: string; url?: string; replication?: number; chunk_size?: number },
  { phase?: string; message?: string; node?: string | null; stats?: PoolStats; capacity?: { total_bytes: number; free_bytes: number } }
>;
export interface PortForward { id: string; protocol: string; external_port: number; internal_address: string; internal_port: number; port?: string | null }
export interface RouterInterface { network: string; subnet: string; cidr: string; gateway: string }
export type Router = Resource<
  { external?: boolean; description?: string; interfaces?: RouterInterface[]; port_forwards?: PortForward[] },
  { phase?: string; message?: string; node?: string | null; external_address?: string | null; [k: string]: unknown }
>;
export type FloatingIp = Resource<
  { port?: string | null; description?: string },
  { address?: string; fixed_address?: string | null; router?: string | null; phase?: string; [k: string]: unknown }
>;
export interface ClusterMember { name: string; address: string; roles: string[]; ready: boolean }
export interface ClusterView {
  mode: "embedded" | "cluster";
  members: ClusterMember[];
  quorum: boolean;
  database: { primary?: string | null; [k: string]: unknown };
  ceph: { health?: string | null; [k: string]: unknown };
  [k: string]: unknown;
}

export interface Role { project: string; role: string }
export interface Me { name: string; cluster_role?: string | null; roles: Role[] }

export interface ClusterStatus {
  version: string;
  node?: string;
  nodes: { total: number; ready: number; [k: string]: number };
  tasks: Record<string, number>;
  instances?: Record<InstanceKind, Record<string, number>>; // per kind: total and per vm_state
}

export interface Page<T> { items: T[]; next_cursor: string | null }

/** An error the API answered with; `detail` is what a person can act on. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly title: string,
    readonly detail: string,
  ) {
    super(detail || title || `HTTP ${status}`);
  }
}

export function asError(e: unknown): ApiError {
  return e instanceof ApiError ? e : new ApiError(0, "Error", e instanceof Error ? e.message : String(e));
}

type Unauthorized = () => void;
let onUnauthorized: Unauthorized = () => {};
let csrfFromLogin = "";

/** Called when any request answers 401: the console goes back to the login page. */
export function setUnauthorizedHandler(fn: Unauthorized): void {
  onUnauthorized = fn;
}

function csrfToken(): string {
  const match = document.cookie.match(/(?:^|;\s*)cairn_csrf=([^;]*)/);
  return match ? decodeURIComponent(match[1]) : csrfFromLogin;
}

async function problem(res: Response): Promise<ApiError> {
  let title = res.statusText;
  let detail = "";
  try {
    const body = await res.json();
    title = body.title ?? title;
    if (typeof body.detail === "string") detail = body.detail;
    else if (body.detail) detail = JSON.stringify(body.detail);
  } catch {
    // not JSON (a proxy's error page): the status line is all we have
  }
  return new ApiError(res.status, title, detail || `${res.status} ${title}`);
}

async function send(method: string, path: string, body: unknown, quiet401: boolean, accept: string): Promise<Response> {
  const headers: Record<string, string> = { Accept: accept };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && method !== "HEAD") headers["X-CSRF-Token"] = csrfToken();
  let res: Response;
  try {
    res = await fetch(path.startsWith("/") ? path : `${API}/${path}`, {
      method,
      headers,
      credentials: "same-origin",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch {
    throw new ApiError(0, "Network error", "Cannot reach the Cairn API: is the appliance up?");
  }
  if (res.status === 401 && !quiet401) onUnauthorized();
  if (!res.ok) throw await problem(res);
  return res;
}

export async function request<T>(method: string, path: string, body?: unknown, quiet401 = false): Promise<T> {
  const res = await send(method, path, body, quiet401, "application/json");
  if (res.status === 204) return undefined as T;
  const text = await res.text();
  return (text ? JSON.parse(text) : undefined) as T;
}

/** The raw answer of a POST (a file to download). */
export async function postForFile(path: string): Promise<Response> {
  return send("POST", path, {}, false, "*/*");
}

/** A plain-text answer (a console log). */
export async function getText(path: string): Promise<string> {
  return (await send("GET", path, undefined, false, "text/plain")).text();
}

export const get = <T>(path: string) => request<T>("GET", path);
export const post = <T>(path: string, body?: unknown) => request<T>("POST", path, body ?? {});
export const del = <T>(path: string) => request<T>("DELETE", path);

/**
 * PUT a file as the request body (an image upload), reporting the bytes sent: fetch()
 * cannot tell upload progress, XMLHttpRequest can. Resolves with the JSON answer.
 */
export function upload<T>(path: string, file: Blob, onProgress: (sent: number, total: number) => void,
  signal?: AbortSignal): Promise<T> {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("PUT", `${API}/${path}`);
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    xhr.setRequestHeader("Accept", "application/json");
    xhr.setRequestHeader("X-CSRF-Token", csrfToken());
    xhr.upload.onprogress = (e) => onProgress(e.loaded, e.lengthComputable ? e.total : file.size);
    xhr.onerror = () => reject(new ApiError(0, "Network error", "the upload was interrupted: is the appliance up?"));
    xhr.onabort = () => reject(new ApiError(0, "Cancelled", "the upload was cancelled"));
    xhr.onload = () => {
      let body: { title?: string; detail?: unknown } | null = null;
      try {
        body = xhr.responseText ? JSON.parse(xhr.responseText) : null;
      } catch {
        body = null;
      }
      if (xhr.status === 401) onUnauthorized();
      if (xhr.status >= 200 && xhr.status < 300) resolve(body as T);
      else {
        const detail = typeof body?.detail === "string" ? body.detail : `${xhr.status} ${xhr.statusText}`;
        reject(new ApiError(xhr.status, body?.title ?? xhr.statusText, detail));
      }
    };
    signal?.addEventListener("abort", () => xhr.abort());
    xhr.send(file);
  });
}

export async function login(username: string, password: string): Promise<Me> {
  const res = await request<{ user: Me; csrf_token: string }>("POST", "auth/login", { username, password }, true);
  csrfFromLogin = res.csrf_token;
  return res.user;
}

export async function logout(): Promise<void> {
  try {
    await request("POST", "auth/logout", undefined, true);
  } finally {
    csrfFromLogin = "";
  }
}

export const me = () => request<Me>("GET", "auth/me", undefined, true);

/** Query string from the set values of `params`. */
export function qs(params: Record<string, string | number | null | undefined>): string {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined && v !== "") q.set(k, String(v));
  const s = q.toString();
  return s ? `?${s}` : "";
}

/** The API's routes ("GET /api/v1/nodes/{name}/drain"), from its OpenAPI document once read. */
const offeredRoutes = new Set<string>();

export function setOfferedRoutes(paths: Record<string, Record<string, unknown>>): void {
  offeredRoutes.clear();
  for (const [path, methods] of Object.entries(paths)) {
    for (const m of Object.keys(methods)) offeredRoutes.add(`${m.toUpperCase()} ${path}`);
  }
}

/** Whether this API offers a route (features land at different times on different nodes). */
export function offers(route: string): boolean {
  return offeredRoutes.has(route);
}

/** Whether the user may read cluster-scoped things (nodes, all users): any cluster role. */
export function clusterReader(user: Me | null): boolean {
  return !!user?.cluster_role;
}

/** Whether the user may change cluster-scoped things (benchmark a node, cancel any task). */
export function canOperate(user: Me | null): boolean {
  if (!user) return false;
  if (user.cluster_role === "admin" || user.cluster_role === "operator") return true;
  return false;
}

/** Whether the user may change things in `project` (create, start, stop, open consoles): operator or admin there. */
export function canWrite(user: Me | null, project: string | null): boolean {
  if (canOperate(user)) return true;
  return !!user && !!project && user.roles.some((r) => r.project === project && r.role !== "viewer");
}
