/** Small SVG pictures: donut, stacked bar, progress bar. Colours come from CSS variables. */

export interface Segment {
  label: string;
  value: number;
  color: string; // a CSS colour, usually var(--...)
}

/** A ring showing `value` of `total`, with the fraction in the middle. */
export function Donut({ value, total, label, color = "var(--ok)", size = 120 }: {
  value: number; total: number; label: string; color?: string; size?: number;
}) {
  const r = 42;
  const c = 2 * Math.PI * r;
  const frac = total > 0 ? Math.min(1, value / total) : 0;
  return (
    <svg class="donut" width={size} height={size} viewBox="0 0 100 100" role="img"
      aria-label={`${label}: ${value} of ${total}`}>
      <circle cx="50" cy="50" r={r} fill="none" stroke="var(--track)" stroke-width="12" />
      {frac > 0 && (
        <circle cx="50" cy="50" r={r} fill="none" stroke={color} stroke-width="12" stroke-linecap={frac < 1 ? "round" : "butt"}
          stroke-dasharray={`${c * frac} ${c}`} transform="rotate(-90 50 50)" />
      )}
      <text x="50" y="49" text-anchor="middle" class="donut-value">{value}/{total}</text>
      <text x="50" y="65" text-anchor="middle" class="donut-label">{label}</text>
    </svg>
  );
}

/** One horizontal bar split into segments, with a legend underneath. */
export function StackedBar({ segments, total, label, format = String }: {
  segments: Segment[]; total?: number; label: string; format?: (n: number) => string;
}) {
  const sum = total ?? segments.reduce((a, s) => a + s.value, 0);
  let x = 0;
  const summary = segments.map((s) => `${s.label} ${format(s.value)}`).join(", ");
  return (
    <figure class="stacked">
      <svg viewBox="0 0 100 6" preserveAspectRatio="none" class="stacked-bar" role="img" aria-label={`${label}: ${summary}`}>
        <rect x="0" y="0" width="100" height="6" rx="1.5" fill="var(--track)" />
        {sum > 0 && segments.map((s) => {
          const w = (s.value / sum) * 100;
          const rect = <rect key={s.label} x={x} y="0" width={w} height="6" fill={s.color}><title>{`${s.label}: ${format(s.value)}`}</title></rect>;
          x += w;
          return rect;
        })}
      </svg>
      <figcaption class="legend">
        {segments.map((s) => (
          <span key={s.label}><i style={{ background: s.color }} aria-hidden="true" />{s.label} <b>{format(s.value)}</b></span>
        ))}
      </figcaption>
    </figure>
  );
}

/** An accessible progress bar (role=progressbar) for tasks. */
export function Progress({ percent, state, label }: { percent: number; state: string; label: string }) {
  const p = Math.max(0, Math.min(100, Number.isFinite(percent) ? percent : 0));
  return (
    <div class={`progress progress-${state}`} role="progressbar" aria-label={label}
      aria-valuemin={0} aria-valuemax={100} aria-valuenow={Math.round(p)}>
      <div class="progress-fill" style={{ width: `${p}%` }} />
      <span class="progress-text">{Math.round(p)}%</span>
    </div>
  );
}

/** A small inline bar for table cells: `used` of `total`, with the numbers beside it. */
export function MiniBar({ used, total, label, text }: { used: number; total: number; label: string; text: string }) {
  const frac = total > 0 ? Math.min(1, used / total) : 0;
  const color = frac > 0.9 ? "var(--bad)" : frac > 0.7 ? "var(--warn)" : "var(--info)";
  return (
    <span class="minibar">
      <svg width="72" height="8" viewBox="0 0 72 8" role="img" aria-label={`${label}: ${text}`}>
        <rect width="72" height="8" rx="4" fill="var(--track)" />
        {frac > 0 && <rect width={Math.max(4, 72 * frac)} height="8" rx="4" fill={color} />}
      </svg>
      <small>{text}</small>
    </span>
  );
}
