/** CPU and memory capacity of one node or the whole cluster, from node inventory. */

import type { Node } from "../api";
import { bytes, plural } from "../format";
import { StackedBar } from "./charts";

export interface Capacity {
  threads: number;
  vcpus: number; // schedulable vCPUs: allocatable threads × overcommit ratio
  vcpusClaimed: number;
  memory: number;
  memoryAllocatable: number;
  memoryClaimed: number;
}

export function capacityOf(nodes: Node[]): Capacity {
  const c: Capacity = { threads: 0, vcpus: 0, vcpusClaimed: 0, memory: 0, memoryAllocatable: 0, memoryClaimed: 0 };
  for (const n of nodes) {
    const inv = n.status.inventory ?? {};
    const alloc = (n.status.allocatable ?? {}) as { cpu?: number; cpu_ratio?: number; memory_bytes?: number };
    const claimed = (n.status.claimed ?? {}) as { cpu?: number; memory_bytes?: number };
    c.threads += inv.threads ?? inv.cores ?? 0;
    c.vcpus += (alloc.cpu ?? 0) * (alloc.cpu_ratio ?? 1);
    c.vcpusClaimed += claimed.cpu ?? 0;
    c.memory += inv.memory_bytes ?? 0;
    c.memoryAllocatable += alloc.memory_bytes ?? 0;
    c.memoryClaimed += claimed.memory_bytes ?? 0;
  }
  return c;
}

const num = (n: number) => (Number.isInteger(n) ? String(n) : n.toFixed(1));

export function CapacityBars({ nodes }: { nodes: Node[] }) {
  const c = capacityOf(nodes);
  const memFree = Math.max(0, c.memoryAllocatable - c.memoryClaimed);
  return (
    <>
      <h3>CPU <span class="muted">{plural(c.threads, "thread")}{nodes.length > 1 ? ` on ${plural(nodes.length, "node")}` : ""}
        {c.vcpus > c.threads && `, ${num(c.vcpus)} schedulable vCPUs (overcommit ${num(c.vcpus / Math.max(1, c.threads))}×)`}</span></h3>
      <StackedBar label="CPU (vCPUs)" total={c.vcpus} format={num}
        segments={[
          { label: "vCPUs claimed by workloads", value: Math.min(c.vcpusClaimed, c.vcpus), color: "var(--info)" },
          { label: "vCPUs free", value: Math.max(0, c.vcpus - c.vcpusClaimed), color: "var(--ok)" },
        ]} />
      <h3>Memory <span class="muted">{bytes(c.memory)}</span></h3>
      <StackedBar label="Memory" total={c.memory} format={bytes}
        segments={[
          { label: "claimed by workloads", value: Math.min(c.memoryClaimed, c.memoryAllocatable), color: "var(--info)" },
          { label: "free", value: memFree, color: "var(--ok)" },
          { label: "reserved for the system", value: Math.max(0, c.memory - c.memoryAllocatable), color: "var(--muted-fill)" },
        ]} />
    </>
  );
}
