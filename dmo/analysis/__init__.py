"""Reading results tables: rank correlations with their uncertainty and baselines, per-mixture comparisons, text
tables, the HTML report and its plots. Works on tables only (never on a study or a model).
"""

from dmo._lazy import lazy_exports

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
