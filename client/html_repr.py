"""What a ``Client`` or ``LocalCluster`` shows of itself in Jupyter (``_repr_html_``) and in a repr.

Pure: built from ``scheduler_info()``'s dict, so a unit test renders it without a cluster.
"""

from __future__ import annotations

from html import escape
from typing import Any


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def summary(info: dict[str, Any]) -> dict[str, Any]:
    """Workers, slots, memory (used, limit) and data held, summed over the workers."""
    workers = list(info.get("workers", {}).values())
    return {
        "workers": len(workers),
        "slots": sum(w.get("nthreads", 0) for w in workers),
        "running": info.get("running", 0),
        "queued": info.get("queued", 0),
        "memory": sum(w.get("memory", 0) or 0 for w in workers),
        "memory_limit": sum(w.get("memory_limit", 0) or 0 for w in workers),
        "data_keys": sum(w.get("data_keys", 0) for w in workers),
        "data_bytes": sum(w.get("data_bytes", 0) for w in workers),
    }


def one_line(kind: str, address: str, info: dict[str, Any] | None, state: str = "") -> str:
    """``<jobsched.Client tcp://...: 2 workers, 2 slots, open>``."""
    details = []
    if info is not None:
        s = summary(info)
        details += [f"{s['workers']} workers", f"{s['slots']} slots"]
    if state:
        details.append(state)
    return f"<jobsched.{kind} {address}" + (": " + ", ".join(details) if details else "") + ">"


def html(kind: str, address: str, dashboard: str, info: dict[str, Any] | None, error: str = "") -> str:
    """An HTML card: the address, a dashboard link, the cluster's totals and one row per worker."""
    link = f'<a href="{escape(dashboard)}" target="_blank">{escape(dashboard)}</a>' if dashboard else "(not known)"
    rows = [("Scheduler", f"<code>{escape(address)}</code>"), ("Dashboard", link)]
    workers_table = ""
    if info is None:
        rows.append(("Status", escape(error or "not connected")))
    else:
        s = summary(info)
        memory = _bytes(s["memory"]) + (f" of {_bytes(s['memory_limit'])}" if s["memory_limit"] else "")
        rows += [
            ("Workers", str(s["workers"])), ("Slots", f"{s['slots']} ({s['running']} running, {s['queued']} queued)"),
            ("Memory", memory), ("Data held", f"{s['data_keys']} keys, {_bytes(s['data_bytes'])}"),
        ]
        cells = "".join(
            f"<tr><td>{escape(str(w.get('name', '')))}</td><td><code>{escape(str(w.get('address', '')))}</code></td>"
            f"<td>{w.get('nthreads', 0)}</td><td>{w.get('running', 0)}</td><td>{_bytes(w.get('memory', 0) or 0)}</td>"
            f"<td>{w.get('data_keys', 0)}</td></tr>"
            for w in info.get("workers", {}).values()
        )
        if cells:
            workers_table = (
                "<details><summary>Workers</summary><table><tr><th>name</th><th>address</th><th>slots</th>"
                f"<th>running</th><th>memory</th><th>data keys</th></tr>{cells}</table></details>"
            )
    body = "".join(f'<tr><th style="text-align:left">{k}</th><td style="text-align:left">{v}</td></tr>' for k, v in rows)
    return f"<div><strong>jobsched.{kind}</strong><table>{body}</table>{workers_table}</div>"
