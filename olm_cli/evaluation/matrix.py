"""The continual-learning matrix R and the forgetting/transfer measures derived from it.

``R[i][j]`` is the held-out loss on domain j after increment i; row 0 is the starting model
(before any increment). Everything is on *losses*, so lower is better and every difference is
"later minus earlier": a positive number means the loss went up (worse). docs/forgetting.md
lists the formulas; :meth:`ContinualMatrix.summary` documents exactly which rows each uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from olm_cli.rundir.atomic import write_text_atomic

Number = float | None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass
class ContinualMatrix:
    """Rows of per-domain losses, one per evaluated model, with the domain each row trained on.

    Domains may appear late (a new eval set): earlier rows then hold None for that column.
    """

    domains: list[str] = field(default_factory=list)
    rows: list[list[Number]] = field(default_factory=list)
    row_labels: list[str] = field(default_factory=list)
    trained_domain_per_row: list[str | None] = field(default_factory=list)

    def add_row(self, label: str, trained_domain: str | None, losses: dict[str, float]) -> None:
        """Append the losses after one increment (``trained_domain`` None for the starting model)."""
        for domain in losses:
            if domain not in self.domains:
                self.domains.append(domain)
                for row in self.rows:
                    row.append(None)
        if trained_domain is not None and trained_domain not in self.domains:
            self.domains.append(trained_domain)
            for row in self.rows:
                row.append(None)
        self.rows.append(
            [None if losses.get(d) is None else float(losses[d]) for d in self.domains]
        )
        self.row_labels.append(label)
        self.trained_domain_per_row.append(trained_domain)

    def value(self, row: int, domain: str) -> Number:
        return self.rows[row][self.domains.index(domain)]

    def trained_rows(self, domain: str) -> list[int]:
        """Rows (>= 1) whose increment trained on ``domain``."""
        return [i for i, d in enumerate(self.trained_domain_per_row) if i >= 1 and d == domain]

    def summary(self, union: dict[str, float] | None = None) -> dict[str, Any]:
        """Forgetting and transfer measures on the final row F = len(rows) - 1.

        With first_j / last_j the first / last row that trained on domain j:

        * ``average_final_loss`` = mean_j R[F][j] over domains with a final value.
        * ``forgetting[j]`` = R[F][j] - min_{first_j <= l < F} R[l][j], for domains trained
          before the final increment and not in it (last_j < F). Positive: the final model is
          worse than the best it ever was on j since it learned j. Not clamped at 0.
        * ``bwt[j]`` = R[F][j] - R[last_j][j] for the same domains; ``bwt`` is their mean.
          Positive = forgetting (loss rose after training moved on); negative = later
          increments helped j.
        * ``fwt[j]`` = R[first_j - 1][j] - R[0][j] for domains first trained at row >= 2 (so
          at least one other increment came before). Negative = earlier increments already
          lowered j's loss (positive transfer).
        * ``intransigence[j]`` = R[last_j][j] - union[j] when a union (joint-training) reference
          is given. Positive = the incremental model learned j less well than joint training.

        Terms whose inputs are missing (None) are skipped.
        """
        final = len(self.rows) - 1
        out: dict[str, Any] = {
            "final_row": final,
            "final_label": self.row_labels[final] if final >= 0 else None,
            "average_final_loss": None,
            "forgetting": {},
            "mean_forgetting": None,
            "bwt_per_domain": {},
            "bwt": None,
            "fwt_per_domain": {},
            "fwt": None,
            "intransigence": {},
            "mean_intransigence": None,
        }
        if final < 0:
            return out
        finals = [v for v in self.rows[final] if v is not None]
        out["average_final_loss"] = _mean(finals)
        for domain in self.domains:
            trained = self.trained_rows(domain)
            if not trained:
                continue
            first, last = trained[0], trained[-1]
            r_final = self.value(final, domain)
            if last < final and r_final is not None:
                earlier = [
                    v for v in (self.value(i, domain) for i in range(first, final)) if v is not None
                ]
                if earlier:
                    out["forgetting"][domain] = r_final - min(earlier)
                r_last = self.value(last, domain)
                if r_last is not None:
                    out["bwt_per_domain"][domain] = r_final - r_last
            if first >= 2:
                before, start = self.value(first - 1, domain), self.value(0, domain)
                if before is not None and start is not None:
                    out["fwt_per_domain"][domain] = before - start
            if union is not None and union.get(domain) is not None:
                r_last = self.value(last, domain)
                if r_last is not None:
                    out["intransigence"][domain] = r_last - float(union[domain])
        out["mean_forgetting"] = _mean(list(out["forgetting"].values()))
        out["bwt"] = _mean(list(out["bwt_per_domain"].values()))
        out["fwt"] = _mean(list(out["fwt_per_domain"].values()))
        out["mean_intransigence"] = _mean(list(out["intransigence"].values()))
        return out

    def to_json(self, union: dict[str, float] | None = None) -> dict[str, Any]:
        """A JSON-ready dict: the matrix itself plus its summary (for ``--json`` and files)."""
        payload: dict[str, Any] = {
            "domains": list(self.domains),
            "rows": [list(r) for r in self.rows],
            "row_labels": list(self.row_labels),
            "trained_domain_per_row": list(self.trained_domain_per_row),
            "summary": self.summary(union),
        }
        if union is not None:
            payload["union"] = dict(union)
        return payload

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ContinualMatrix:
        matrix = cls(
            domains=list(data["domains"]),
            rows=[[None if v is None else float(v) for v in r] for r in data["rows"]],
            row_labels=list(data["row_labels"]),
            trained_domain_per_row=list(data["trained_domain_per_row"]),
        )
        if not (len(matrix.rows) == len(matrix.row_labels) == len(matrix.trained_domain_per_row)):
            raise ValueError("matrix rows, row_labels and trained_domain_per_row differ in length")
        if any(len(r) != len(matrix.domains) for r in matrix.rows):
            raise ValueError("every matrix row needs one value per domain")
        return matrix

    @classmethod
    def from_json(cls, path: Path) -> ContinualMatrix:
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))

    def save(self, path: Path, union: dict[str, float] | None = None) -> None:
        """Write the JSON atomically (tmp + fsync + os.replace) so a reader never sees half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(self.to_json(union), indent=2))  # mode from the umask, not mkstemp's 0600

    def render(self, console: Console, union: dict[str, float] | None = None) -> None:
        """Print the matrix (trained cell marked) and the per-domain measures as rich tables."""
        matrix = Table(title="Loss after each increment (rows) on each domain (columns)")
        matrix.add_column("row", justify="right")
        matrix.add_column("after")
        matrix.add_column("trained")
        for domain in self.domains:
            matrix.add_column(domain, justify="right")
        for i, row in enumerate(self.rows):
            trained = self.trained_domain_per_row[i]
            cells = []
            for domain, v in zip(self.domains, row, strict=True):
                text = "-" if v is None else f"{v:.4f}"
                cells.append(f"[bold]{text}*[/bold]" if domain == trained else text)
            matrix.add_row(str(i), self.row_labels[i], trained or "-", *cells)
        console.print(matrix)

        s = self.summary(union)
        measures = Table(title="Per-domain measures (losses: positive = worse)")
        for col in ("domain", "final", "forgetting", "BWT", "FWT", "intransigence"):
            measures.add_column(col, justify="left" if col == "domain" else "right")
        final = s["final_row"]
        for domain in self.domains:
            measures.add_row(
                domain,
                _fmt(self.value(final, domain) if final >= 0 else None, signed=False),
                _fmt(s["forgetting"].get(domain)),
                _fmt(s["bwt_per_domain"].get(domain)),
                _fmt(s["fwt_per_domain"].get(domain)),
                _fmt(s["intransigence"].get(domain)),
            )
        measures.add_section()
        measures.add_row(
            "mean",
            _fmt(s["average_final_loss"], signed=False),
            _fmt(s["mean_forgetting"]),
            _fmt(s["bwt"]),
            _fmt(s["fwt"]),
            _fmt(s["mean_intransigence"]),
        )
        console.print(measures)
        console.print("* = domain trained in that increment; see docs/forgetting.md for formulas.")


def _fmt(value: float | None, signed: bool = True) -> str:
    if value is None:
        return "-"
    return f"{value:+.4f}" if signed else f"{value:.4f}"
