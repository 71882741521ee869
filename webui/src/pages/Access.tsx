import { clusterReader, type Me, type Resource } from "../api";
import { Badge, Empty, ErrorBox, Loading, PageHeader } from "../components/ui";
import { when } from "../format";
import { useLiveList } from "../hooks";

type User = Resource<{ display_name?: string; email?: string }, { cluster_role?: string | null; roles?: { project: string; role: string }[]; active?: boolean }>;
type Project = Resource<{ description?: string; quota?: Record<string, number | null> }>;

export function Access({ user }: { user: Me }) {
  const users = useLiveList<User>(clusterReader(user) ? "users" : "", "user");
  const projects = useLiveList<Project>("projects", "project");
  return (
    <>
      <PageHeader title="Users & projects" />
      <section class="section" aria-labelledby="users-h">
        <h2 id="users-h">Users</h2>
        {!clusterReader(user) && (
          <table class="table">
            <thead><tr><th>Name</th><th>Project roles</th></tr></thead>
            <tbody><tr><td><b>{user.name}</b> <span class="muted">(you; the user list is for cluster roles)</span></td>
              <td>{user.roles.map((r) => <span key={r.project} class="chip">{r.project}: {r.role}</span>)}</td></tr></tbody>
          </table>
        )}
        <ErrorBox error={users.error} onRetry={users.reload} />
        {users.loading && users.items.length === 0 && <Loading what="users" />}
        {clusterReader(user) && !users.loading && !users.error && users.items.length === 0 && <Empty>No users visible to you.</Empty>}
        {users.items.length > 0 && (
          <table class="table">
            <thead><tr><th>Name</th><th>Display name</th><th>Cluster role</th><th>Project roles</th><th>Active</th><th>Created</th></tr></thead>
            <tbody>{users.items.map((u) => (
              <tr key={u.id}>
                <td><b>{u.name}</b></td>
                <td>{u.spec.display_name || "—"}</td>
                <td>{u.status.cluster_role ? <Badge value={u.status.cluster_role} tone="info" /> : "—"}</td>
                <td>{u.status.roles?.length ? u.status.roles.map((r) => <span key={r.project} class="chip">{r.project}: {r.role}</span>) : "—"}</td>
                <td>{u.status.active === false ? <Badge value="disabled" tone="bad" /> : "yes"}</td>
                <td>{when(u.created_at)}</td>
              </tr>
            ))}</tbody>
          </table>
        )}
        {users.more && <button type="button" onClick={users.loadMore}>Load more</button>}
      </section>
      <section class="section" aria-labelledby="projects-h">
        <h2 id="projects-h">Projects</h2>
        <ErrorBox error={projects.error} onRetry={projects.reload} />
        {projects.loading && projects.items.length === 0 && <Loading what="projects" />}
        {projects.items.length > 0 && (
          <table class="table">
            <thead><tr><th>Name</th><th>Description</th><th>Quota</th><th>Created</th></tr></thead>
            <tbody>{projects.items.map((p) => {
              const quota = Object.entries(p.spec.quota ?? {}).filter(([, v]) => v !== null && v !== undefined);
              return (
                <tr key={p.id}>
                  <td><b>{p.name}</b></td>
                  <td>{p.spec.description || "—"}</td>
                  <td>{quota.length ? quota.map(([k, v]) => <span key={k} class="chip">{k} {String(v)}</span>) : "unlimited"}</td>
                  <td>{when(p.created_at)}</td>
                </tr>
              );
            })}</tbody>
          </table>
        )}
        {projects.more && <button type="button" onClick={projects.loadMore}>Load more</button>}
      </section>
    </>
  );
}
