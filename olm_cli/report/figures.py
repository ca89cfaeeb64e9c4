"""The report's figures, drawn with matplotlib from :func:`olm_cli.report.sources.gather`'s data.

matplotlib's object API with the Agg canvas, never ``pyplot``: nothing global is switched (no
backend, no current figure), so rendering inside a training process leaves it as it was, and
no display is needed. Each figure is a PNG (embedded in the page) plus the facts it was drawn
from (``meta``: which increments, how many points), which the page writes next to it so that a
reader, or a test, can check the picture against the data.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure as MplFigure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

DPI = 100
_WIDTH = 7.2  # inches: two figures side by side on a 1440-pixel-wide page
_SKIPPED_MARKS = 200  # vertical marks for skipped batches at most (the table lists them all)


@dataclass
class Figure:
    """One rendered figure: what the page embeds, and what it says in words."""

    id: str
    title: str
    alt: str
    png: bytes
    meta: dict[str, Any] = field(default_factory=dict)


def _colours(count: int) -> list[Any]:
    """A colour per increment: tab10's distinct ones while they last, then a continuous scale."""
    from matplotlib import colormaps

    if count <= 10:
        return [colormaps["tab10"](i) for i in range(count)]
    return [colormaps["viridis"](i / max(1, count - 1)) for i in range(count)]


def domain_colours(domains: list[str]) -> dict[str, Any]:
    """One colour per domain, the same in every figure (tab10, in the order given, then tab20)."""
    from matplotlib import colormaps

    palette = colormaps["tab10"] if len(domains) <= 10 else colormaps["tab20"]
    return {domain: palette(i % palette.N) for i, domain in enumerate(domains)}


def _tick_stride(count: int, most: int = 15) -> int:
    """Label every k-th of ``count`` categories so that at most ``most`` labels fit on an axis."""
    return max(1, math.ceil(count / most))


def _plural(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def _listing(values: list[Any], most: int = 10) -> str:
    """``values`` for a caption: all of them while few, else the first and last."""
    if not values:
        return "none"
    if len(values) <= most:
        return ", ".join(map(str, values))
    return f"{values[0]}, {values[1]}, ... {values[-1]}"


def _png(figure: MplFigure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _increment_legend(ax: Any, increments: list[int]) -> None:
    if len(increments) <= 10:
        ax.legend(title="increment", fontsize=8, title_fontsize=8, loc="upper right", ncols=min(5, len(increments)))
    else:
        ax.text(0.99, 0.97, f"colour: increment {increments[0]} (purple) to {increments[-1]} (yellow)",
                transform=ax.transAxes, ha="right", va="top", fontsize=8)


def training_figure(training: dict[str, Any], cooldowns: list[dict[str, Any]] | None = None) -> Figure | None:
    """Loss, learning rate and tokens/s per logged step, each increment in its colour.

    A cooldown branch (``optim.schedule: wsd``) is a shaded span from the trunk step it branched
    off, with its own loss and rate dashed: the trunk's solid curve continues beneath it.
    """
    steps: list[int] = training["step"]
    cooldowns = cooldowns or []
    if not steps and not cooldowns:
        return None
    increments = sorted(set(training["increment"]) | {int(c["increment"]) for c in cooldowns})
    colours = dict(zip(increments, _colours(len(increments)), strict=True))
    figure = MplFigure(figsize=(_WIDTH, 6.4), layout="constrained")
    axes = figure.subplots(3, 1, sharex=True)
    series = (("loss", "training loss"), ("lr", "learning rate"), ("tokens_per_s", "tokens/s"))
    for ax, (key, label) in zip(axes, series, strict=True):
        for increment in increments:
            points = [(s, v) for s, i, v in zip(steps, training["increment"], training[key], strict=True)
                      if i == increment and v is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, color=colours[increment], linewidth=1.0, marker="." if len(points) < 60 else None,
                        markersize=3, label=str(increment))
        for span in cooldowns:
            ax.axvspan(span["from_step"], span["from_step"] + max(span["done_steps"], 1), color="0.5",
                       alpha=0.15 if span["complete"] else 0.08, linewidth=0)
            points = [(s, v) for s, v in zip(span["step"], span.get(key) or [], strict=False) if v is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                first = ax is axes[0] and span is cooldowns[0]
                ax.plot(xs, ys, color=colours[int(span["increment"])], linestyle="--", linewidth=1.0,
                        marker="." if len(points) < 60 else None, markersize=3,
                        label="cooldown" if first else None)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for mark in training["skipped"][:_SKIPPED_MARKS]:
        if isinstance(mark.get("step"), int):
            axes[0].axvline(mark["step"], color="red", alpha=0.5, linewidth=0.8)
    _increment_legend(axes[0], increments)
    axes[2].set_xlabel("step (since the run began)")
    figure.suptitle("Training, per step, coloured by increment", fontsize=11)
    shown = f"{training['shown_steps']} of {training['logged_steps']} logged steps" \
        if training["shown_steps"] != training["logged_steps"] else f"{training['logged_steps']} logged steps"
    skipped = f"; {_plural(len(training['skipped']), 'skipped batch', 'skipped batches')} marked in red" \
        if training["skipped"] else ""
    branches = ""
    if cooldowns:
        partial = [c["increment"] for c in cooldowns if not c["complete"]]
        branches = (f"; cooldown branches of increments {_listing([c['increment'] for c in cooldowns])} shaded grey "
                    "from the trunk step they branched off, their loss and learning rate dashed"
                    + (f" (increment {_listing(partial)} unfinished, lighter)" if partial else ""))
    extent = f" (steps {steps[0]} to {steps[-1]})" if steps else ""
    alt = (f"Training loss, learning rate and tokens per second over {shown}{extent}, "
           f"{len(increments)} increments ({_listing(increments)}){skipped}{branches}")
    return Figure("training", "Training", alt, _png(figure),
                  {"increments": increments, "points": len(steps), "first_step": steps[0] if steps else None,
                   "last_step": steps[-1] if steps else None,
                   "cooldowns": [[c["increment"], c["from_step"], c["to_step"]] for c in cooldowns]})


def eval_figure(matrix: dict[str, Any] | None, releases: list[dict[str, Any]],
                colours: dict[str, Any] | None = None) -> Figure | None:
    """Held-out loss per domain after each increment (the matrix's rows), rejected releases marked."""
    if not matrix or not matrix["rows"]:
        return None
    labels: list[str] = matrix["row_labels"]
    figure = MplFigure(figsize=(_WIDTH, 3.8), layout="constrained")
    ax = figure.subplots()
    xs = list(range(len(labels)))
    for column, domain in enumerate(matrix["domains"]):
        points = [(x, row[column]) for x, row in zip(xs, matrix["rows"], strict=True) if row[column] is not None]
        if points:
            px, py = zip(*points, strict=True)
            ax.plot(px, py, marker="o", markersize=4, label=domain, color=(colours or {}).get(domain))
    rejected = sorted({int(r["increment"]) for r in releases if r.get("released") is False
                       and isinstance(r.get("increment"), int)})
    for increment in rejected:
        label = "start" if increment == 0 else f"inc {increment}"
        if label in labels:
            ax.axvspan(labels.index(label) - 0.4, labels.index(label) + 0.4, color="red", alpha=0.12)
    every = _tick_stride(len(labels))
    ax.set_xticks(xs[::every], labels[::every], rotation=45 if len(labels) > 12 else 0, fontsize=8)
    ax.set_ylabel("held-out loss (lower is better)")
    ax.set_xlabel("after")
    ax.grid(alpha=0.3)
    ax.legend(title="domain", fontsize=8, title_fontsize=8)
    figure.suptitle("Held-out loss per domain after each increment", fontsize=11)
    note = f"; increments not released by the gate shaded red: {_listing(rejected)}" if rejected else ""
    alt = (f"Held-out loss of {len(matrix['domains'])} domains ({', '.join(matrix['domains'])}) "
           f"over {len(labels)} evaluations ({_listing(labels)}){note}")
    return Figure("eval", "Held-out loss", alt, _png(figure),
                  {"rows": labels, "domains": list(matrix["domains"]), "rejected": rejected})


def _last_trained(matrix: dict[str, Any]) -> list[list[float | None]]:
    """Each cell minus the domain's loss right after the latest increment that trained it (up to that row)."""
    out: list[list[float | None]] = []
    last: dict[int, float] = {}
    for i, row in enumerate(matrix["rows"]):
        trained = matrix["trained_domain_per_row"][i]
        if trained in matrix["domains"] and i >= 1:
            column = matrix["domains"].index(trained)
            if row[column] is not None:
                last[column] = row[column]
        out.append([None if v is None or c not in last else v - last[c] for c, v in enumerate(row)])
    return out


def matrix_figure(matrix: dict[str, Any] | None) -> Figure | None:
    """The continual-learning matrix as a heatmap, and its change since each domain was trained."""
    if not matrix or not matrix["rows"]:
        return None
    import numpy as np

    domains, labels = matrix["domains"], matrix["row_labels"]
    values = np.array([[math.nan if v is None else v for v in row] for row in matrix["rows"]], dtype=float)
    change = np.array([[math.nan if v is None else v for v in row] for row in _last_trained(matrix)], dtype=float)
    height = min(1.6 + 0.42 * len(labels), 9.0)
    figure = MplFigure(figsize=(_WIDTH, height), layout="constrained")
    left, right = figure.subplots(1, 2)
    image = left.imshow(values, cmap="YlOrRd", aspect="auto")
    figure.colorbar(image, ax=left, shrink=0.9, label="loss")
    bound = float(np.nanmax(np.abs(change))) if np.isfinite(change).any() else 0.0
    bound = bound if bound > 0 else 1.0
    image = right.imshow(change, cmap="RdBu_r", aspect="auto", norm=TwoSlopeNorm(0.0, -bound, bound))
    figure.colorbar(image, ax=right, shrink=0.9, label="loss change")
    small = len(labels) * len(domains) <= 120
    for ax, grid, fmt in ((left, values, "{:.2f}"), (right, change, "{:+.2f}")):
        ax.set_xticks(range(len(domains)), domains, fontsize=8, rotation=30 if len(domains) > 4 else 0)
        every = _tick_stride(len(labels), most=20)
        ax.set_yticks(range(0, len(labels), every), labels[::every], fontsize=8)
        for i, trained in enumerate(matrix["trained_domain_per_row"]):
            if trained in domains and small:
                ax.add_patch(Rectangle((domains.index(trained) - 0.5, i - 0.5), 1, 1, fill=False,
                                       edgecolor="black", linewidth=1.6))
            for j in range(len(domains)):
                if small and math.isfinite(grid[i, j]):
                    red, green, blue, _ = ax.images[0].to_rgba(grid[i, j])
                    dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
                    ax.text(j, i, fmt.format(grid[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
    left.set_title("loss after each increment", fontsize=9)
    right.set_title("change since the domain was last trained\n(red: forgotten, blue: improved)", fontsize=9)
    figure.suptitle("Continual-learning matrix (boxed: the domain trained in that increment)", fontsize=11)
    alt = (f"Heatmaps of the continual-learning matrix: {len(labels)} rows ({_listing(labels)}) by "
           f"{len(domains)} domains ({', '.join(domains)}), and each loss's change since its domain was last trained")
    return Figure("matrix", "Forgetting matrix", alt, _png(figure), {"rows": labels, "domains": list(domains)})


def replay_figure(replay: dict[str, Any], colours: dict[str, Any] | None = None) -> Figure | None:
    """Replay's share of the trained samples, and the buffer's composition by domain, per increment."""
    share: dict[str, float] = replay["share"]
    composition: dict[str, dict[str, Any]] = replay["composition"]
    if not any(share.values()) and not composition:
        return None
    figure = MplFigure(figsize=(_WIDTH, 3.4), layout="constrained")
    left, right = figure.subplots(1, 2)
    increments = sorted(int(k) for k in share)
    left.bar(increments, [100 * share[str(i)] for i in increments], color="tab:blue")
    left.set_xlabel("increment")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_ylabel("replayed samples (% of trained)")
    left.set_title("replay share", fontsize=9)
    left.grid(axis="y", alpha=0.3)
    found = {d for entry in composition.values() for d in entry.get("by_domain", {})}
    domains = [d for d in (colours or {}) if d in found] + sorted(found - set(colours or {}))
    keys = sorted(composition, key=int)
    positions = [int(k) for k in keys]
    bottom = [0.0] * len(keys)
    for domain in domains:
        counts = [float(composition[k]["by_domain"].get(domain, 0)) for k in keys]
        totals = [max(1.0, float(sum(composition[k]["by_domain"].values()))) for k in keys]
        heights = [100 * c / t for c, t in zip(counts, totals, strict=True)]
        right.bar(positions, heights, bottom=bottom, label=domain, color=(colours or {}).get(domain))
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    right.set_xlabel("increment (buffer as of its last checkpoint)")
    right.set_ylabel("% of buffered samples")
    right.set_title("replay buffer composition", fontsize=9)
    if domains:
        right.legend(title="domain", fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    else:
        right.text(0.5, 0.5, "no replay snapshot on disk", ha="center", va="center", transform=right.transAxes)
    figure.suptitle("Replay per increment", fontsize=11)
    alt = (f"Replay share of the trained samples for increments {_listing(increments)}, "
           f"and the buffer's composition by domain ({', '.join(domains) or 'none'}) after increments "
           f"{_listing(keys)}")
    return Figure("replay", "Replay", alt, _png(figure),
                  {"share_increments": increments, "composition_increments": [int(k) for k in keys], "domains": domains})


def ledger_figure(ledger: dict[str, Any]) -> Figure | None:
    """Tokens counted to shards, per increment that started them, split by the shards' status."""
    per_increment: dict[str, dict[str, int]] = ledger["tokens_per_increment"]
    if not per_increment:
        return None
    figure = MplFigure(figsize=(_WIDTH, 2.8), layout="constrained")
    ax = figure.subplots()
    keys = list(per_increment)
    positions = [int(k) for k in keys]
    statuses = sorted({s for bucket in per_increment.values() for s in bucket})
    palette = {"done": "tab:green", "in_progress": "tab:blue", "quarantined": "tab:red", "changed": "tab:orange"}
    bottom = [0] * len(keys)
    for status in statuses:
        heights = [per_increment[k].get(status, 0) for k in keys]
        ax.bar(positions, heights, bottom=bottom, label=status, color=palette.get(status))
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set_xlabel("increment")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("tokens")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="shard status", fontsize=8, title_fontsize=8)
    figure.suptitle("Tokens trained from new shards per increment", fontsize=11)
    alt = f"Tokens trained from new shards in increments {_listing(keys)}, by shard status ({', '.join(statuses)})"
    return Figure("ledger", "Shards", alt, _png(figure), {"increments": [int(k) for k in keys], "statuses": statuses})


def extra_metrics_figure(extra: dict[str, list[dict[str, Any]]]) -> Figure | None:
    """Any other metric the eval history holds (downstream tasks ...), against the increment."""
    plotted = {name: [(p["increment"], p["value"]) for p in points if isinstance(p.get("increment"), int)]
               for name, points in extra.items()}
    plotted = {name: points for name, points in plotted.items() if points}
    if not plotted:
        return None
    figure = MplFigure(figsize=(_WIDTH, 3.4), layout="constrained")
    ax = figure.subplots()
    for name, points in sorted(plotted.items())[:20]:
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", markersize=4, label=name)
    ax.set_xlabel("increment")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    figure.suptitle("Other evaluation metrics", fontsize=11)
    alt = (f"{_plural(len(plotted), 'further evaluation metric', 'further evaluation metrics')} against the "
           f"increment: {', '.join(sorted(plotted)[:20])}")
    return Figure("extra", "Other metrics", alt, _png(figure), {"metrics": sorted(plotted)})


def all_figures(data: dict[str, Any]) -> dict[str, Figure | None]:
    """Every figure of the page by id; None where its data does not exist yet."""
    evaluation = data["eval"]
    known = list((evaluation["matrix"] or {}).get("domains", []))
    buffered = {d for entry in data["replay"]["composition"].values() for d in entry.get("by_domain", {})}
    colours = domain_colours(known + sorted(buffered - set(known)))
    return {
        "training": training_figure(data["training"], data.get("cooldowns")),
        "eval": eval_figure(evaluation["matrix"], data["releases"], colours),
        "matrix": matrix_figure(evaluation["matrix"]),
        "extra": extra_metrics_figure(evaluation["extra_metrics"]),
        "replay": replay_figure(data["replay"], colours),
        "ledger": ledger_figure(data["ledger"]),
    }
