import { useState } from "preact/hooks";
import { ApiError, post, TASK_STATES, type Me, type Task, type TaskState } from "../api";
import { Progress } from "../components/charts";
import { Badge, Empty, ErrorBox, Loading, PageHeader } from "../components/ui";
import { duration, resultLabel, resultValue, when } from "../format";
import { useLiveList, useTick } from "../hooks";
import { navigate } from "../router";

export function Tasks({ user }: { user: Me | null }) {
  const state = (new URLSearchParams(location.search).get("state") ?? "") as TaskState | "";
  const tasks = useLiveList<Task>("tasks", "task", { state: state || null }, (t) => !state || t.state === state);
  const [actionError, setActionError] = useState<ApiError | null>(null);
  const now = useTick(1000);

  async function cancel(t: Task) {
    setActionError(null);
    try {
      await post(`tasks/${t.id}/cancel`);
    } catch (e) {
      setActionError(e instanceof ApiError ? e : new ApiError(0, "Error", String(e)));
    }
  }

  return (
    <>
      <PageHeader title="Tasks">
        <label class="inline">
          State{" "}
          <select value={state} onChange={(e) => {
            const v = (e.target as HTMLSelectElement).value;
            navigate(v ? `/tasks?state=${v}` : "/tasks");
          }}>
            <option value="">all</option>
            {TASK_STATES.map((s) => <option key={s} value={s}>{s}</option>)}
          </select>
        </label>
      </PageHeader>
      <ErrorBox error={tasks.error} onRetry={tasks.reload} />
      <ErrorBox error={actionError} />
      {tasks.loading && tasks.items.length === 0 && <Loading what="tasks" />}
      {!tasks.loading && !tasks.error && tasks.items.length === 0 && (
        <Empty>{state ? `No ${state} tasks.` : "No tasks yet. Long operations (benchmarks, creates, migrations) show up here with their progress."}</Empty>
      )}
      {tasks.items.length > 0 && (
        <table class="table tasks">
          <thead>
            <tr><th>Task</th><th>On</th><th>State</th><th class="w-progress">Progress</th><th>Started</th><th>Duration</th><th><span class="sr-only">Actions</span></th></tr>
          </thead>
          <tbody>
            {tasks.items.map((t) => {
              const active = t.state === "pending" || t.state === "running";
              const mine = user && (user.cluster_role === "admin" || user.cluster_role === "operator" ||
                user.roles.some((r) => r.project === t.project && r.role !== "viewer"));
              return (
                <tr key={t.id}>
                  <td><b>{t.name}</b><br /><small class="muted mono" title="task id">{t.id.slice(0, 8)}</small>
                    {t.attempts > 1 && <small class="muted"> · attempt {t.attempts}</small>}</td>
                  <td>{t.resource ? <>{t.resource.kind}{" "}
                    {t.resource.kind === "node" ? <a href={`/nodes/${encodeURIComponent(t.resource.name)}`}><b>{t.resource.name}</b></a> : <b>{t.resource.name}</b>}</> : "—"}{t.project && <><br /><small class="muted">{t.project}</small></>}</td>
                  <td><Badge value={t.state} /></td>
                  <td>
                    <Progress percent={t.state === "succeeded" ? 100 : t.progress?.percent ?? 0} state={t.state} label={`${t.name} progress`} />
                    {(t.error || t.progress?.message) && (
                      <small class={t.error ? "error-text" : "muted"}>{t.error ?? t.progress.message}</small>
                    )}
                    {t.state === "succeeded" && t.result && Object.keys(t.result).length > 0 && (
                      <small class="result">{Object.entries(t.result).map(([k, v]) => `${resultLabel(k)}: ${resultValue(v)}`).join(" · ")}</small>
                    )}
                  </td>
                  <td title={when(t.created_at)}>{when(t.started_at)}</td>
                  <td>{duration(t.started_at, t.finished_at, now)}</td>
                  <td>{active && mine && <button type="button" class="small" onClick={() => cancel(t)}>Cancel</button>}</td>
                </tr>
              );
            })}
          </tbody>
        </table>
      )}
      {tasks.more && <button type="button" onClick={tasks.loadMore}>Load more</button>}
    </>
  );
}
