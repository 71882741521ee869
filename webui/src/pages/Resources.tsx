import { type Resource } from "../api";
import { Badge, Empty, ErrorBox, Loading, PageHeader } from "../components/ui";
import { when } from "../format";
import { useLiveList } from "../hooks";

/** A read-only list for any other kind the API offers (found in its OpenAPI schema). */
export interface Kind {
  path: string; // "vms", "security-groups"
  title: string; // "VMs"
  event: string; // the kind name in events: "vm", "security_group"
}

function stateOf(r: Resource): string | null {
  const s = r.status as Record<string, unknown>;
  for (const k of ["phase", "vm_state", "state", "power_state"]) if (typeof s?.[k] === "string") return s[k] as string;
  return null;
}

export function Resources({ kind }: { kind: Kind }) {
  const list = useLiveList<Resource>(kind.path, kind.event);
  return (
    <>
      <PageHeader title={kind.title} />
      <ErrorBox error={list.error} onRetry={list.reload} />
      {list.loading && list.items.length === 0 && <Loading what={kind.title} />}
      {!list.loading && !list.error && list.items.length === 0 && <Empty>No {kind.title.toLowerCase()} yet.</Empty>}
      {list.items.length > 0 && (
        <table class="table">
          <thead><tr><th>Name</th><th>Project</th><th>State</th><th>Generation</th><th>Created</th></tr></thead>
          <tbody>{list.items.map((r) => {
            const st = stateOf(r);
            return (
              <tr key={r.id}>
                <td><b>{r.name}</b></td>
                <td>{r.project ?? "—"}</td>
                <td>{st ? <Badge value={st} /> : "—"}</td>
                <td>{r.observed_generation}/{r.generation}</td>
                <td>{when(r.created_at)}</td>
              </tr>
            );
          })}</tbody>
        </table>
      )}
      {list.more && <button type="button" onClick={list.loadMore}>Load more</button>}
    </>
  );
}
