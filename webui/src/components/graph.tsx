/** A line chart of time series (SVG, no library): lines break where samples are missing;
 * hovering shows every line's value at that time. Colours come from CSS variables. */

import { useState } from "preact/hooks";

export interface Line {
  label: string;
  color: string;
  points: [number, number][]; // [unix seconds, value], oldest first
}

const W = 640;
const H = 190;
const PAD = { left: 62, right: 12, top: 10, bottom: 24 };

/** 1, 2, 2.5, 5 × 10^n at or above `v`: the top of the y axis; with `binary`, that many
 * B, KiB, MiB… (so the ticks read 256 MiB, not 244.1 MiB). */
export function niceCeil(v: number, binary = false): number {
  if (!(v > 0)) return 1;
  const unit = binary ? Math.pow(1024, Math.max(0, Math.floor(Math.log(v) / Math.log(1024)))) : 1;
  const x = v / unit;
  const p = Math.pow(10, Math.floor(Math.log10(x)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= x) return m * p * unit;
  return 10 * p * unit;
}

function timeLabel(t: number, span: number): string {
  const d = new Date(t * 1000);
  if (span <= 86400) return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  return d.toLocaleDateString([], { weekday: "short", day: "numeric" });
}

/** SVG path data; a gap longer than `gap` seconds lifts the pen. */
function pathOf(points: [number, number][], x: (t: number) => number, y: (v: number) => number, gap: number): string {
  let d = "";
  let prev = -Infinity;
  for (const [t, v] of points) {
    d += `${t - prev > gap ? "M" : "L"}${x(t).toFixed(1)},${y(v).toFixed(1)}`;
    prev = t;
  }
  return d;
}

export function LineChart({ title, lines, start, end, step, format, floor, binary = false }: {
  title: string;
  lines: Line[];
  start: number;
  end: number;
  step: number;
  format: (v: number) => string;
  floor?: number; // the y axis reaches at least this (100 for percentages of a whole)
  binary?: boolean; // byte values: ticks in powers of 1024
}) {
  const [hover, setHover] = useState<number | null>(null);
  const all = lines.flatMap((l) => l.points.map((p) => p[1]));
  const top = niceCeil(Math.max(floor ?? 0, ...all.map((v) => v * 1.05), 0), binary);
  const span = Math.max(1, end - start);
  const x = (t: number) => PAD.left + ((t - start) / span) * (W - PAD.left - PAD.right);
  const y = (v: number) => PAD.top + (1 - v / top) * (H - PAD.top - PAD.bottom);
  const ticks = [0, 0.25, 0.5, 0.75, 1].map((f) => f * top);
  const times = [0, 1, 2, 3, 4].map((i) => start + (i * span) / 4);
  const samples = lines.reduce((a, l) => a + l.points.length, 0);
  const latest = lines.map((l) => `${l.label} ${l.points.length ? format(l.points[l.points.length - 1][1]) : "no data"}`);

  function onMove(e: MouseEvent) {
    const svg = (e.currentTarget as SVGElement).ownerSVGElement ?? (e.currentTarget as SVGSVGElement);
    const box = svg.getBoundingClientRect();
    const px = ((e.clientX - box.left) / box.width) * W;
    const t = start + ((px - PAD.left) / (W - PAD.left - PAD.right)) * span;
    setHover(Math.min(end, Math.max(start, t)));
  }
  const nearest = (l: Line): [number, number] | null => {
    if (hover === null || !l.points.length) return null;
    let best = l.points[0];
    for (const p of l.points) if (Math.abs(p[0] - hover) < Math.abs(best[0] - hover)) best = p;
    return Math.abs(best[0] - hover) <= step * 1.5 ? best : null;
  };

  return (
    <figure class="graph" data-testid={`graph-${title}`} data-samples={samples}>
      <figcaption class="graph-title">{title}</figcaption>
      <svg viewBox={`0 0 ${W} ${H}`} role="img" aria-label={`${title}: ${latest.join(", ")}`}
        onMouseLeave={() => setHover(null)}>
        {ticks.map((v) => (
          <g key={v}>
            <line x1={PAD.left} x2={W - PAD.right} y1={y(v)} y2={y(v)} class="graph-grid" />
            <text x={PAD.left - 6} y={y(v) + 4} text-anchor="end" class="graph-axis">{format(v)}</text>
          </g>
        ))}
        {times.map((t, i) => (
          <text key={t} x={x(t)} y={H - 6} text-anchor={i === 0 ? "start" : i === times.length - 1 ? "end" : "middle"}
            class="graph-axis">{timeLabel(t, span)}</text>
        ))}
        {lines.map((l) => (
          <path key={l.label} d={pathOf(l.points, x, y, step * 2.5)} fill="none" stroke={l.color} stroke-width="1.8"
            stroke-linejoin="round" />
        ))}
        {hover !== null && <line x1={x(hover)} x2={x(hover)} y1={PAD.top} y2={H - PAD.bottom} class="graph-cursor" />}
        {lines.map((l) => {
          const p = nearest(l);
          return p && <circle key={l.label} cx={x(p[0])} cy={y(p[1])} r="3" fill={l.color} />;
        })}
        <rect x={PAD.left} y={PAD.top} width={W - PAD.left - PAD.right} height={H - PAD.top - PAD.bottom}
          fill="transparent" onMouseMove={onMove} />
      </svg>
      <div class="legend">
        {lines.map((l) => {
          const p = hover !== null ? nearest(l) : l.points[l.points.length - 1];
          return (
            <span key={l.label}><i style={{ background: l.color }} aria-hidden="true" />{l.label}{" "}
              <b>{p ? format(p[1]) : "—"}</b></span>
          );
        })}
        {hover !== null && <span class="graph-when">{new Date(hover * 1000).toLocaleString()}</span>}
        {samples === 0 && <span>No samples in this range yet.</span>}
      </div>
    </figure>
  );
}
