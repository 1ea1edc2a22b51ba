"""Reading results tables: rank correlations with their uncertainty and baselines, per-mixture comparisons, text
tables, the HTML report and its plots. Works on tables only (never on a study or a model).
"""

from typing import TYPE_CHECKING

from dmo._lazy import lazy_exports

if TYPE_CHECKING:  # the same names for a type checker; at run time each is imported on first use
    from dmo.analysis.compare import compare as compare
    from dmo.analysis.correlate import correlate as correlate
    from dmo.analysis.correlate import spearman as spearman
    from dmo.analysis.html_report import build_report as build_report
    from dmo.analysis.html_report import write_report as write_report
    from dmo.analysis.tables import render_compare as render_compare
    from dmo.analysis.tables import render_correlation as render_correlation

_EXPORTS = {
    "correlate": "dmo.analysis.correlate",
    "spearman": "dmo.analysis.correlate",
    "compare": "dmo.analysis.compare",
    "render_correlation": "dmo.analysis.tables",
    "render_compare": "dmo.analysis.tables",
    "build_report": "dmo.analysis.html_report",
    "write_report": "dmo.analysis.html_report",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
