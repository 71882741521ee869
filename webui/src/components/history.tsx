/** History graphs of a node, an instance or a pool over the last hour, day or week
 * (`GET …/metrics?range=`), read again while the page is open. */

import { useState } from "preact/hooks";
import { qs } from "../api";
import { bytes } from "../format";
import { useFetch, usePoll } from "../hooks";
import { LineChart, type Line } from "./graph";
import { ErrorBox, Loading } from "./ui";

export type Range = "hour" | "day" | "week";
export interface Series { name: string; unit: string; points: [number, number][] }
export interface Metrics { range: Range; start: number; end: number; step: number; series: Series[] }

const RANGES: [Range, string][] = [["hour", "Hour"], ["day", "Day"], ["week", "Week"]];

export const rate = (v: number) => `${bytes(v)}/s`;
const percent = (v: number) => `${v >= 10 || v === 0 ? v.toFixed(0) : v.toFixed(1)} %`;
const ops = (v: number) => `${v >= 10 || v === 0 ? v.toFixed(0) : v.toFixed(v < 1 ? 2 : 1)}/s`;
const ratio = (v: number) => `${v.toFixed(2)}×`;

interface Chart {
  title: string;
  lines: [string, string, string][]; // series name, label, colour
  format: (v: number) => string;
  floor?: number;
  binary?: boolean;
}

/** CPU, memory (its lines differ: see MEMORY), network and disks of a node or an instance. */
const compute = (memory: [string, string, string][]): Chart[] => [
  { title: "CPU", lines: [["cpu", "CPU", "var(--info)"]], format: percent, floor: 100 },
  { title: "Memory", lines: memory, format: bytes, floor: 1 << 20, binary: true },
  { title: "Network", lines: [["net_in", "in", "var(--ok)"], ["net_out", "out", "var(--info)"]], format: rate, floor: 1024, binary: true },
  { title: "Disk throughput", lines: [["disk_read", "read", "var(--ok)"], ["disk_write", "write", "var(--warn)"]], format: rate, floor: 1024, binary: true },
  { title: "Disk IOPS", lines: [["disk_read_iops", "read", "var(--ok)"], ["disk_write_iops", "write", "var(--warn)"]], format: ops, floor: 1 },
];
/** A node: in use (total less available) against its memory. An instance: what it uses
 * inside (a VM's guest reports it through its balloon driver, else the line is empty), what
 * it holds on the host (a VM's QEMU process: guest RAM plus QEMU's own memory, which can
 * exceed what the guest was given) and what it was given. */
const MEMORY: Record<"node" | "vm" | "container", [string, string, string][]> = {
  node: [["memory", "used", "var(--info)"], ["memory_total", "total", "var(--muted-fill)"]],
  vm: [["memory", "guest used", "var(--info)"], ["memory_host", "host resident", "var(--warn)"],
    ["memory_total", "total", "var(--muted-fill)"]],
  container: [["memory", "used", "var(--info)"], ["memory_host", "host resident", "var(--warn)"],
    ["memory_total", "total", "var(--muted-fill)"]],
};
const POOL: Chart[] = [
  { title: "Space", lines: [["logical_bytes", "logical", "var(--info)"], ["stored_bytes", "stored", "var(--ok)"]], format: bytes,
    floor: 1 << 20, binary: true },
  { title: "Ratios", lines: [["dedup_ratio", "dedup", "var(--info)"], ["compression_ratio", "compression", "var(--ok)"]],
    format: ratio, floor: 1 },
];

/** `path`: the object's API path ("nodes/n1", "vms/web?project=default"). */
export function History({ path, what }: { path: string; what: "node" | "vm" | "container" | "pool" }) {
  const [range, setRange] = useState<Range>("hour");
  const [base, query = ""] = path.split("?");
  const params = Object.fromEntries(new URLSearchParams(query));
  const data = useFetch<Metrics>(`${base}/metrics${qs({ ...params, range })}`);
  usePoll(data.reload, range === "hour" ? 15_000 : 60_000);
  const m = data.data;
  const byName = new Map((m?.series ?? []).map((s) => [s.name, s]));
  return (
    <section class="section history" aria-labelledby="history-h">
      <div class="history-bar">
        <h2 id="history-h">History</h2>
        <div class="segmented" role="group" aria-label="Time range">
          {RANGES.map(([r, label]) => (
            <button key={r} type="button" class="small" aria-pressed={r === range} onClick={() => setRange(r)}>{label}</button>
          ))}
        </div>
      </div>
      <ErrorBox error={data.error} onRetry={data.reload} />
      {!m && data.loading && <Loading what="the graphs" />}
      {m && (
        <div class="graphs">
          {(what === "pool" ? POOL : compute(MEMORY[what])).map((c) => {
            const lines: Line[] = c.lines.map(([name, label, color]) => ({ label, color, points: byName.get(name)?.points ?? [] }));
            return <LineChart key={c.title} title={c.title} lines={lines} start={m.start} end={m.end} step={m.step}
              format={c.format} floor={c.floor} binary={c.binary} />;
          })}
        </div>
      )}
    </section>
  );
}
