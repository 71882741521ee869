/** "Paste…": text to send to a console, taken from the clipboard when the browser lets us
 * read it (else typed or pasted into the box). */

import { useEffect, useState } from "preact/hooks";
import { Dialog } from "../components/dialog";

export function PasteDialog({ title, hint, onSend, onClose }: {
  title: string;
  hint: string;
  onSend: (text: string) => string | null; // returns a warning to show, or null when all went
  onClose: () => void;
}) {
  const [text, setText] = useState("");
  const [note, setNote] = useState<string | null>(null);
  useEffect(() => {
    // Reading the clipboard needs the page's permission; without it the box is filled by hand.
    navigator.clipboard?.readText?.().then((t) => setText((old) => old || t)).catch(() => {});
  }, []);
  return (
    <Dialog title={title} onClose={onClose}>
      <form onSubmit={(e) => {
        e.preventDefault();
        const warning = onSend(text);
        if (warning) setNote(warning);
        else onClose();
      }}>
        <div class="dialog-body">
          <label class="field">Text
            <textarea name="text" rows={6} class="mono" value={text} autofocus
              onInput={(e) => setText((e.target as HTMLTextAreaElement).value)} />
          </label>
          <p class="hint">{hint}</p>
          {note && <p class="notice" role="status">{note}</p>}
        </div>
        <footer class="dialog-footer">
          <button type="button" onClick={onClose}>{note ? "Close" : "Cancel"}</button>
          {!note && <button type="submit" class="primary" disabled={!text}>Send</button>}
        </footer>
      </form>
    </Dialog>
  );
}
