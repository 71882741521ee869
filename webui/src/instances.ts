/** VMs and containers: what the console knows about the two kinds, and which actions fit which state. */

import { API, type Instance, type InstanceKind } from "./api";

export interface InstanceKindInfo {
  kind: InstanceKind;
  path: "vms" | "containers";
  title: string; // "VMs"
  one: string; // "VM"
  many: string; // "VMs", "containers": in a sentence
}

export const INSTANCE_KINDS: Record<"vms" | "containers", InstanceKindInfo> = {
  vms: { kind: "vm", path: "vms", title: "VMs", one: "VM", many: "VMs" },
  containers: { kind: "container", path: "containers", title: "Containers", one: "container", many: "containers" },
};

export type Action = "start" | "stop" | "reboot" | "pause" | "resume";

// The vm_states each action may start from (the API checks the same: appliance/services/instances.py).
const FROM: Record<Action, string[]> = {
  start: ["stopped", "error"],
  stop: ["active", "paused", "error"],
  reboot: ["active"],
  pause: ["active"],
  resume: ["paused"],
};

/** Whether `action` makes sense now: no other operation holds the instance and its state allows it. */
export function canAct(inst: Instance, action: Action | "migrate" | "delete"): boolean {
  if (inst.status.task_state) return false;
  if (action === "delete") return true;
  if (action === "migrate") return inst.status.vm_state === "active";
  return FROM[action].includes(inst.status.vm_state);
}

/** "10.20.0.2, 10.30.0.5" from the attached ports. */
export function addressesOf(inst: Instance): string[] {
  return (inst.status.ports ?? []).flatMap((p) => (p.ips ?? []).map((ip) => ip.address));
}

export function hasConsole(inst: Instance, kind: string): boolean {
  return (inst.status.consoles ?? []).some((c) => c.kind === kind);
}

/** The path of one instance's REST resource, with its project. */
export function instancePath(info: InstanceKindInfo, name: string, project: string, sub = ""): string {
  return `${info.path}/${encodeURIComponent(name)}${sub}?project=${encodeURIComponent(project)}`;
}

/** The console's own URL of an instance page. */
export function instanceHref(info: InstanceKindInfo, name: string, project: string | null, tab = ""): string {
  const q = project && project !== "default" ? `?project=${encodeURIComponent(project)}` : "";
  return `/${info.path}/${encodeURIComponent(name)}${tab ? `/${tab}` : ""}${q}`;
}

/** ws(s)://<this host>/api/v1/… : consoles authenticate with the session cookie of this origin. */
export function socketUrl(path: string): string {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}${API}/${path}`;
}
