/** A modal dialog on the native <dialog> element: focus is trapped, Escape closes it. */

import type { ComponentChildren } from "preact";
import { useEffect, useId, useRef } from "preact/hooks";

export function Dialog({ title, onClose, children, wide = false }: {
  title: string;
  onClose: () => void;
  children: ComponentChildren;
  wide?: boolean;
}) {
  const ref = useRef<HTMLDialogElement>(null);
  const id = useId();
  useEffect(() => {
    const d = ref.current;
    if (d && !d.open) {
      d.showModal();
      // The first field, not the close button, takes the focus (autofocus is not applied after the first page load).
      d.querySelector<HTMLElement>("[autofocus], input, select, textarea")?.focus();
    }
    return () => d?.close();
  }, []);
  return (
    <dialog ref={ref} class={wide ? "dialog wide" : "dialog"} aria-labelledby={id}
      onCancel={(e) => { e.preventDefault(); onClose(); }}>
      <header class="dialog-header">
        <h2 id={id}>{title}</h2>
        <button type="button" class="link-button close" aria-label="Close" onClick={onClose}>×</button>
      </header>
      {children}
    </dialog>
  );
}

/** "Are you sure?" for actions that cannot be undone. */
export function Confirm({ title, children, confirm, danger = false, busy = false, onConfirm, onClose }: {
  title: string;
  children: ComponentChildren;
  confirm: string;
  danger?: boolean;
  busy?: boolean;
  onConfirm: () => void;
  onClose: () => void;
}) {
  return (
    <Dialog title={title} onClose={onClose}>
      <div class="dialog-body">{children}</div>
      <footer class="dialog-footer">
        <button type="button" onClick={onClose}>Cancel</button>
        <button type="button" class={danger ? "danger" : "primary"} disabled={busy} onClick={onConfirm}>{confirm}</button>
      </footer>
    </Dialog>
  );
}
