"""Load-generator output: merging workers' reports, the live progress view (rich), the PNG plot."""

from __future__ import annotations

from typing import Any

from hdrh.histogram import HdrHistogram

from .loadgen import hdr_summary, new_histogram


def merge_reports(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from several worker processes: counts summed, HDR histograms merged exactly,
    per-second timelines summed (per-second percentiles: the worst worker's, an upper bound)."""
    if len(parts) == 1:
        return parts[0]
    out: dict[str, Any] = {"workers": len(parts), "run_ids": [p["run_id"] for p in parts],
                           "spec": parts[0]["spec"]}
    for key in ("messages", "acked", "delivered", "send_order_inversions", "foreign_messages"):
        out[key] = sum(p.get(key, 0) for p in parts)
    checks: dict[str, int] = {}
    for p in parts:
        for k, v in p["checks"].items():
            checks[k] = checks.get(k, 0) + v
    out["checks"] = checks
    out["ok"] = all(p["ok"] for p in parts)
    out["examples"] = {k: sum((p["examples"].get(k, []) for p in parts), [])[:5] for k in parts[0]["examples"]}
    hdr: dict[str, str] = {}
    latency: dict[str, Any] = {}
    for name in ("ack", "e2e"):
        h = new_histogram()
        for p in parts:
            h.add(HdrHistogram.decode(p["hdr"][name].encode()))
        hdr[name] = h.encode().decode()
        latency[name] = hdr_summary(h)
    latency["open_to_assigned"] = max((p["latency_ms"]["open_to_assigned"] for p in parts),
                                      key=lambda s: s.get("p99", 0))
    out["latency_ms"], out["hdr"] = latency, hdr
    faults: dict[str, dict[str, Any]] = {}
    for p in parts:
        for f in p["faults"]:
            cur = faults.setdefault(f["label"], dict(f))
            for k in ("resumed_s", "routed_s"):
                a, b = cur.get(k), f.get(k)
                cur[k] = None if a is None or b is None else max(a, b)
    out["faults"] = list(faults.values())
    out["clients"] = {k: sum(p["clients"][k] for p in parts) for k in ("sessions", "reconnects", "resent")}
    out["nacks"], out["errors"] = _sum_dicts(p["nacks"] for p in parts), _sum_dicts(p["errors"] for p in parts)
    out["transcripts"] = None if parts[0].get("transcripts") is None else {
        k: (sum(p["transcripts"][k] for p in parts) if k != "examples" else
            sum((p["transcripts"]["examples"] for p in parts), [])[:5]) for k in parts[0]["transcripts"]}
    seconds: dict[int, dict[str, Any]] = {}
    for p in parts:
        for row in p["timeline"]:
            cur = seconds.setdefault(row["t"], {"t": row["t"], "sent": 0, "acked": 0, "delivered": 0})
            for k in ("sent", "acked", "delivered"):
                cur[k] += row[k]
            for k in ("e2e_p50_ms", "e2e_p99_ms", "e2e_max_ms"):
                if k in row:
                    cur[k] = max(cur.get(k, 0), row[k])
    out["timeline"] = [seconds[t] for t in sorted(seconds)]
    out["parts"] = [{k: p[k] for k in ("run_id", "messages", "checks", "ok", "faults")} for p in parts]
    return out


def _sum_dicts(dicts: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def progress_table(p: dict[str, Any], title: str = "Parley load") -> Any:
    from rich.table import Table

    t = Table(title=title, show_header=False, expand=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    checks = p.get("checks", {})
    bad = {k: v for k, v in checks.items() if v}
    e2e = p.get("e2e_recent_ms", {})
    t.add_row("elapsed", f"{p.get('elapsed_s', 0):.0f} s")
    t.add_row("sessions", f"{p.get('connected', 0)}/{p.get('clients', 0)} connected, {p.get('reconnects', 0)} reconnects")
    t.add_row("conversations", f"{p.get('assigned', 0)}/{p.get('conversations', 0)} assigned")
    t.add_row("messages", f"sent {p.get('sent', 0):,}  acked {p.get('acked', 0):,}  delivered {p.get('delivered', 0):,}")
    t.add_row("in flight", f"{p.get('in_flight', 0):,} sends not yet acked")
    t.add_row("delivered/s", f"{p.get('rate_delivered', 0):,.0f}")
    t.add_row("e2e last 2 s", f"p50 {e2e.get('p50', '—')} ms  p99 {e2e.get('p99', '—')} ms  max {e2e.get('max', '—')} ms")
    t.add_row("checks", "[green]all zero so far[/green]" if not bad else f"[red]{bad}[/red]")
    if p.get("faults"):
        t.add_row("faults", ", ".join(p["faults"]))
    return t


def plot(report: dict[str, Any], path: str, title: str = "Parley load") -> None:
    """End-to-end latency per second (p50/p99/max, log scale) and delivered msgs/s, faults marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report.get("timeline", []) if "e2e_p50_ms" in r]
    fig, ax = plt.subplots(figsize=(11, 5))
    if rows:
        ts = [r["t"] for r in rows]
        ax.plot(ts, [r["e2e_p50_ms"] for r in rows], label="e2e p50", lw=1.2)
        ax.plot(ts, [r["e2e_p99_ms"] for r in rows], label="e2e p99", lw=1.2)
        ax.plot(ts, [r["e2e_max_ms"] for r in rows], label="e2e max", lw=0.8, alpha=0.6)
        ax.set_yscale("log")
    ax.set_xlabel("seconds since the load generator started")
    ax.set_ylabel("end-to-end latency, ms (intended send → delivered)")
    ax2 = ax.twinx()
    all_rows = report.get("timeline", [])
    ax2.bar([r["t"] for r in all_rows], [r["delivered"] for r in all_rows], width=0.9, alpha=0.15, color="grey",
            label="delivered/s")
    ax2.set_ylabel("messages delivered per second")
    for f in report.get("faults", []):
        ax.axvline(f["t"], color="red", ls="--", lw=1)
        resumed = f" (resumed {f['resumed_s']} s)" if f.get("resumed_s") is not None else ""
        ax.annotate(f["label"] + resumed, (f["t"], 1), xycoords=("data", "axes fraction"), rotation=90,
                    va="top", ha="right", fontsize=8, color="red")
    lines, labels = ax.get_legend_handles_labels()
    l2, lb2 = ax2.get_legend_handles_labels()
    ax.legend(lines + l2, labels + lb2, loc="upper left", fontsize=8)
    checks = report.get("checks", {})
    verdict = "all checks passed" if report.get("ok") else "FAILED: " + ", ".join(f"{k}={v}" for k, v in checks.items() if v)
    ax.set_title(f"{title} — {report.get('messages', 0):,} messages — {verdict}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_lines(report: dict[str, Any]) -> list[str]:
    lat = report.get("latency_ms", {})
    lines = [
        f"messages {report.get('messages', 0):,}, acked {report.get('acked', 0):,}, delivered {report.get('delivered', 0):,}",
        f"ack latency ms: {_lat(lat.get('ack', {}))}",
        f"end-to-end latency ms: {_lat(lat.get('e2e', {}))}",
        f"open → assigned ms: {_lat(lat.get('open_to_assigned', {}))}",
        "checks: " + ", ".join(f"{k}={v}" for k, v in report.get("checks", {}).items()),
        f"send-order inversions (not a failure): {report.get('send_order_inversions', 0)}; "
        f"reconnects {report.get('clients', {}).get('reconnects', 0)}, resent {report.get('clients', {}).get('resent', 0)}",
    ]
    for f in report.get("faults", []):
        lines.append(f"fault at {f['t']} s: {f['label']}: delivery resumed after {f.get('resumed_s')} s, "
                     f"new conversation routed in {f.get('routed_s')} s")
    lines.append("RESULT: " + ("OK" if report.get("ok") else "FAILED"))
    return lines


def _lat(s: dict[str, Any]) -> str:
    if not s.get("n"):
        return "—"
    return f"p50 {s['p50']} p90 {s['p90']} p99 {s['p99']} p99.9 {s['p999']} max {s['max']} (n={s['n']:,})"
