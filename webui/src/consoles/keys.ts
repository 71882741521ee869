/**
 * Keys for the VNC console: text typed as key presses (a US keyboard: each character is
 * the key that makes it, with Shift where needed) and the combinations a browser keeps
 * for itself (Ctrl-Alt-Del, Ctrl-Alt-F1…F12, Alt-SysRq-<key>). Each press carries the
 * keysym and the physical key (`code`): QEMU takes the scancode when the viewer offers it.
 */

export interface Press { keysym: number; code: string }
/** One step: a key going down or up. */
export type Stroke = [Press, boolean];

export const SHIFT: Press = { keysym: 0xffe1, code: "ShiftLeft" };
export const CTRL: Press = { keysym: 0xffe3, code: "ControlLeft" };
export const ALT: Press = { keysym: 0xffe9, code: "AltLeft" };
export const SYSRQ: Press = { keysym: 0xff15, code: "PrintScreen" };
export const fKey = (n: number): Press => ({ keysym: 0xffbe + n - 1, code: `F${n}` });

const SPECIAL: Record<string, Press> = {
  "\n": { keysym: 0xff0d, code: "Enter" },
  "\t": { keysym: 0xff09, code: "Tab" },
  " ": { keysym: 0x20, code: "Space" },
};
// unshifted, shifted, physical key
const ROWS: [string, string, string][] = [
  ["`", "~", "Backquote"], ["-", "_", "Minus"], ["=", "+", "Equal"], ["[", "{", "BracketLeft"],
  ["]", "}", "BracketRight"], ["\\", "|", "Backslash"], [";", ":", "Semicolon"], ["'", '"', "Quote"],
  [",", "<", "Comma"], [".", ">", "Period"], ["/", "?", "Slash"],
  ["1", "!", "Digit1"], ["2", "@", "Digit2"], ["3", "#", "Digit3"], ["4", "$", "Digit4"], ["5", "%", "Digit5"],
  ["6", "^", "Digit6"], ["7", "&", "Digit7"], ["8", "*", "Digit8"], ["9", "(", "Digit9"], ["0", ")", "Digit0"],
];

/** The key (and whether Shift is held) that types `ch` on a US keyboard; null if there is none. */
export function keyFor(ch: string): { press: Press; shift: boolean } | null {
  if (SPECIAL[ch]) return { press: SPECIAL[ch], shift: false };
  if (/^[a-z]$/.test(ch)) return { press: { keysym: ch.charCodeAt(0), code: `Key${ch.toUpperCase()}` }, shift: false };
  if (/^[A-Z]$/.test(ch)) return { press: { keysym: ch.charCodeAt(0), code: `Key${ch}` }, shift: true };
  for (const [plain, shifted, code] of ROWS) {
    if (ch === plain) return { press: { keysym: plain.charCodeAt(0), code }, shift: false };
    if (ch === shifted) return { press: { keysym: shifted.charCodeAt(0), code }, shift: true };
  }
  return null;
}

/** The strokes that type `text`; characters no US key makes are left out (and listed). */
export function typing(text: string): { strokes: Stroke[]; skipped: string[] } {
  const strokes: Stroke[] = [];
  const skipped: string[] = [];
  for (const ch of text.replace(/\r\n?/g, "\n")) {
    const k = keyFor(ch);
    if (!k) {
      skipped.push(ch);
      continue;
    }
    if (k.shift) strokes.push([SHIFT, true]);
    strokes.push([k.press, true], [k.press, false]);
    if (k.shift) strokes.push([SHIFT, false]);
  }
  return { strokes, skipped };
}

/** Hold `held` down (in order), tap `key`, release them (in reverse). */
export function combo(held: Press[], key: Press): Stroke[] {
  return [...held.map((p): Stroke => [p, true]), [key, true], [key, false], ...held.slice().reverse().map((p): Stroke => [p, false])];
}

/** Ctrl-Alt-F<n>: switch the guest's virtual terminal. */
export const ctrlAltF = (n: number): Stroke[] => combo([CTRL, ALT], fKey(n));

/** Alt-SysRq-<letter>: the kernel's magic SysRq (h: help, s: sync, u: remount read-only, b: reboot…). */
export function sysrq(letter: string): Stroke[] {
  const k = keyFor(letter.toLowerCase());
  return k ? combo([ALT, SYSRQ], k.press) : [];
}

export const SYSRQ_KEYS: [string, string][] = [
  ["h", "help"], ["s", "sync disks"], ["u", "remount read-only"], ["b", "reboot now"], ["o", "power off"],
  ["e", "terminate all tasks"], ["i", "kill all tasks"], ["k", "kill on the console"], ["m", "show memory"],
  ["t", "show tasks"], ["w", "show blocked tasks"], ["c", "crash (kdump)"], ["r", "keyboard raw mode off"],
];
