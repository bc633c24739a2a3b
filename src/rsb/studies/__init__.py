"""The paper's other results, from the stages' JSON outputs only: the seed study (fig. 5-6), training cost against
accuracy (fig. 1), the recipes across architectures (fig. 3), A2 vs T2 (fig. 8) and transfer learning (fig. 7).
One module per study: its rows (from the stages' outputs), markdown, CSV, figure, and `report(params, out)`, which
`build` runs for `python -m stages.studies <study>`.

Statistics are taken at the end of training (the last epoch's model, as the paper's seed study), with the sample
standard deviation (n - 1); a statistic that n does not define (std of one seed, a correlation of fewer than three)
is None and shows as an empty cell, never as 0.
"""

from __future__ import annotations

from pathlib import Path

from rsb import tracking
from rsb.config import Params
from rsb.io import refuse_overlap
from rsb.studies import architectures, cost, procedures, seeds, transfer

STUDIES = {"seeds": seeds, "cost": cost, "architectures": architectures, "procedures": procedures, "transfer": transfer}


def build(params: Params, study: str, out: Path) -> dict:
    """One study's report files under `out` (<study>.md/.csv/.png) and its MLflow parent run; returns its metrics."""
    refuse_overlap(
        {"--out": out},
        {
            "metrics": Path("metrics"),
            "studies": Path("studies"),
            "data.prepared": Path(params.data.prepared),
            "data.raw": Path(params.data.raw),
        },
    )
    out.mkdir(parents=True, exist_ok=True)
    metrics, children = STUDIES[study].report(params, out)
    metrics = {k: float(v) for k, v in metrics.items() if v is not None}
    label = {
        "seeds": f"{params.seeds.arch}-{params.seeds.recipe}, {len(params.seeds.seeds)} seeds",
        "procedures": f"{' x '.join(params.procedures.models)} under {', '.join(params.procedures.recipes)}",
        "transfer": f"{params.transfer.arch} from {', '.join(params.transfer.starts)} to "
        f"{', '.join(params.transfer.datasets)}",
    }.get(study, ", ".join(params.models))
    tracking.study_run(
        params.experiment,
        study,
        label,
        metrics,
        sorted(out.glob(f"{study}.*")),
        children,
        tracking.digest(params),
        Path(params.data.prepared),
    )
    return metrics
