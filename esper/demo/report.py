"""The demo's ending: the SQL it asks PostgreSQL (printed as it ran), the summary
table, and a PNG of the loss curves with growth events marked (matplotlib when
installed, else ``esper.demo.png``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

# -- the SQL --------------------------------------------------------------------------

PIPELINE_SQL = """\
SELECT event, count(DISTINCT kernel_id) AS kernels
  FROM kernel_history
 WHERE event IN ('compiled', 'validated', 'ready', 'rejected')
 GROUP BY event"""

FATES_SQL = """\
SELECT blueprint_name, backend, target, kernel_status,
       string_agg(event, ' -> ' ORDER BY event_seq) AS journey,
       (array_agg(detail -> 'reasons' ORDER BY event_seq DESC)
          FILTER (WHERE event = 'rejected'))[1] AS reasons
  FROM kernel_history
 GROUP BY kernel_id, blueprint_name, backend, target, kernel_status
 ORDER BY min(event_seq)"""

SEEDS_SQL = """\
SELECT event, count(*) AS n
  FROM seed_events
 WHERE run_id = :run
 GROUP BY event"""

JOURNEY_SQL = """\
SELECT h.at, h.blueprint_name AS blueprint, 'kernel' AS what, h.event,
       h.detail ->> 'stage' AS where_, NULL AS why
  FROM kernel_history h
 WHERE h.cache_key IN (SELECT kernel_cache_key FROM seed_events WHERE run_id = :run)
UNION ALL
SELECT s.at, b.name, 'seed', s.event, s.site || '[' || s.seed || '] step ' || s.step,
       s.detail ->> 'reason'
  FROM seed_events s
  JOIN kernels k ON k.cache_key = s.kernel_cache_key
  JOIN blueprints b ON b.hash = k.blueprint_hash
 WHERE s.run_id = :run
 ORDER BY at"""


@dataclass
class History:
    """What the SQL says about the pipeline and the run."""

    pipeline: dict[str, int]
    fates: list[dict[str, Any]]
    seeds: dict[str, int]
    journey: list[dict[str, Any]]


async def read_history(engine: AsyncEngine, run_id: str) -> History:
    async with engine.connect() as conn:
        pipeline = {r.event: r.kernels for r in await conn.execute(text(PIPELINE_SQL))}
        fates = [dict(r._mapping) for r in await conn.execute(text(FATES_SQL))]
        seeds = {r.event: r.n for r in await conn.execute(text(SEEDS_SQL), {"run": run_id})}
        journey = [dict(r._mapping) for r in await conn.execute(text(JOURNEY_SQL),
                                                                {"run": run_id})]
    return History(pipeline, fates, seeds, journey)


# -- the summary ----------------------------------------------------------------------


@dataclass
class Comparison:
    """Final validation losses after the same steps on the same data."""

    growing: float
    static_start: float
    static_grown: float | None
    params_start: int
    params_grown: int
    steps: int = 0
    param_steps: float = 0.0
    """The growing run's compute: parameters in use, summed over steps."""


@dataclass
class DemoSummary:
    history: History
    comparison: Comparison
    png: Path | None = None
    plot_backend: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.history.pipeline.get("ready", 0) > 0


def _reason(reasons: Any) -> str:
    if not reasons:
        return ""
    first = reasons[0] if isinstance(reasons, list) else reasons
    if isinstance(first, dict):
        return f"{first.get('check', '?')}: {first.get('message', '')}"
    return str(first)


def format_summary(s: DemoSummary) -> str:
    h, c = s.history, s.comparison
    p = h.pipeline
    lines = [
        "",
        "== summary ==",
        f"kernels: {p.get('compiled', 0)} compiled, {p.get('validated', 0)} validated, "
        f"{p.get('ready', 0)} deployed, {p.get('rejected', 0)} rejected",
    ]
    for f in h.fates:
        line = f"  {f['blueprint_name']:<20} {f['target']:<11} {f['backend']:<8} " \
               f"{f['kernel_status']:<9} {f['journey']}"
        if f["reasons"]:
            line += f"\n  {'':<20} why: {_reason(f['reasons'])[:150]}"
        lines.append(line)
    lines.append(
        f"seeds: {h.seeds.get('germinated', 0)} germinated, "
        f"{h.seeds.get('fossilized', 0)} fossilized, {h.seeds.get('culled', 0)} culled"
    )
    grown = "n/a (nothing fossilized)" if c.static_grown is None else f"{c.static_grown:.4f}"
    rows = [
        (f"growing host ({c.params_start:,} -> {c.params_grown:,} params)", f"{c.growing:.4f}"),
        (f"static host, start size ({c.params_start:,} params)", f"{c.static_start:.4f}"),
        (f"static host, grown size ({c.params_grown:,} params)", grown),
    ]
    width = max(len(label) for label, _ in rows) + 2
    lines.append("final validation loss (same steps, same data):")
    lines += [f"  {label:<{width}}{value}" for label, value in rows]
    if c.steps and c.param_steps and c.static_grown is not None:
        share = c.param_steps / (c.params_grown * c.steps)
        lines.append(f"compute (parameters in use x steps): the growing host used "
                     f"{share:.0%} of the static grown host's")
    if s.png is not None:
        lines.append(f"loss curve: {s.png} ({s.plot_backend})")
    if s.timings:
        lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in s.timings.items()))
    return "\n".join(lines)


def format_journey(h: History, limit: int = 40) -> str:
    lines = ["", "== the journey of every grown kernel (kernel_history + seed_events) =="]
    for r in h.journey[:limit]:
        where = r["where_"] or ""
        why = f"  ({r['why']})" if r["why"] else ""
        lines.append(f"  {r['at']:%H:%M:%S.%f}"[:-3] + f"  {r['blueprint']:<18} {r['what']:<6} "
                     f"{r['event']:<14} {where}{why}")
    if len(h.journey) > limit:
        lines.append(f"  … {len(h.journey) - limit} more rows")
    return "\n".join(lines)


def format_sql(run_id: str) -> str:
    blocks = [("kernels per pipeline step", PIPELINE_SQL),
              ("each kernel's fate", FATES_SQL),
              ("seeds of this run", SEEDS_SQL.replace(":run", f"'{run_id}'")),
              ("the journey", JOURNEY_SQL.replace(":run", f"'{run_id}'"))]
    out = ["", "== the SQL behind it (psql: see docs/SQL.md to connect) =="]
    for title, sql in blocks:
        out += [f"-- {title}", sql + ";", ""]
    return "\n".join(out)


# -- the plot --------------------------------------------------------------------------


@dataclass(frozen=True)
class Curve:
    label: str
    points: list[tuple[int, float]]
    color: tuple[int, int, int]
    width: int = 2


@dataclass(frozen=True)
class Marker:
    step: int
    kind: str  # germinated | fossilized | culled
    label: str


MARKER_COLORS = {"germinated": (46, 160, 67), "fossilized": (128, 60, 170),
                 "culled": (214, 39, 40)}


def plot(path: Path, curves: list[Curve], markers: list[Marker], title: str) -> str:
    """Write the PNG; returns which renderer drew it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _plot_builtin(path, curves, markers, title)
        return "built-in PNG writer"
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=100)
    for c in curves:
        xs, ys = zip(*c.points, strict=True) if c.points else ((), ())
        ax.plot(xs, ys, label=c.label, color=[v / 255 for v in c.color], linewidth=c.width / 1.5)
    seen: set[str] = set()
    for m in markers:
        color = [v / 255 for v in MARKER_COLORS.get(m.kind, (0, 0, 0))]
        ax.axvline(m.step, color=color, linestyle="--", linewidth=1,
                   label=m.kind if m.kind not in seen else None)
        seen.add(m.kind)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (MSE)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return "matplotlib"


def _plot_builtin(path: Path, curves: list[Curve], markers: list[Marker], title: str) -> None:
    from esper.demo.png import Canvas

    w, h = 900, 520
    left, right, top, bottom = 70, 20, 40, 50
    canvas = Canvas(w, h)
    values = [v for c in curves for _, v in c.points if v > 0 and math.isfinite(v)]
    steps = [s for c in curves for s, _ in c.points] + [m.step for m in markers]
    if not values or not steps:
        canvas.save(path)
        return
    lo, hi = math.log10(min(values)), math.log10(max(values))
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5
    xmax = max(*steps, 1)

    def px(step: float) -> float:
        return left + (w - left - right) * step / xmax

    def py(v: float) -> float:
        return top + (h - top - bottom) * (hi - math.log10(max(v, 1e-12))) / (hi - lo)

    grey = (200, 200, 200)
    mults = (1, 2, 5) if hi - lo > 1 else (1, 1.5, 2, 3, 4, 5, 6, 8)
    for decade in range(math.floor(lo), math.ceil(hi) + 1):
        for mult in mults:
            v = mult * 10.0**decade
            if lo <= math.log10(v) <= hi:
                y = round(py(v))
                canvas.box(left, y, w - right, y + 1, grey)
                label = f"{v:.3g}"
                canvas.text(left - 6 - canvas.text_width(label), y - 3, label)
    tick = _nice_step(xmax)
    for s in range(0, xmax + 1, tick):
        x = round(px(s))
        canvas.box(x, h - bottom, x + 1, h - bottom + 5, (0, 0, 0))
        canvas.text(x - canvas.text_width(str(s)) // 2, h - bottom + 9, str(s))
    canvas.box(left, top, left + 1, h - bottom, (0, 0, 0))
    canvas.box(left, h - bottom, w - right, h - bottom + 1, (0, 0, 0))
    for m in markers:
        color = MARKER_COLORS.get(m.kind, (0, 0, 0))
        canvas.dashed_vline(round(px(m.step)), top, h - bottom, color)
    for c in curves:
        canvas.polyline([(px(s), py(v)) for s, v in c.points if v > 0], c.color, c.width)
    canvas.text(left, 6, title.upper(), scale=2)
    canvas.text(w // 2 - 12, h - 18, "STEP")
    canvas.text(8, top - 12, "LOSS (MSE, LOG SCALE)")
    legend = [(c.label, c.color) for c in curves]
    legend += [(k, MARKER_COLORS[k]) for k in MARKER_COLORS if any(m.kind == k for m in markers)]
    lw = max(canvas.text_width(label) for label, _ in legend) + 30
    x0, y = w - right - lw - 8, top + 8
    canvas.box(x0 - 6, y - 6, w - right - 2, y + 14 * len(legend) + 2, (245, 245, 245))
    for label, color in legend:
        canvas.box(x0, y + 2, x0 + 18, y + 5, color)
        canvas.text(x0 + 24, y, label)
        y += 14
    canvas.save(path)


def _nice_step(span: int) -> int:
    for step in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 2500, 5000, 10000):
        if span / step <= 10:
            return step
    return max(1, span // 10)
