"""The RibFrac challenge metric: FROC detection score, Dice/IoU, and classification F1.

``evaluate_folders`` scores a prediction folder against ground truth, ``froc_from_hits``
computes the FROC curve from matches decided elsewhere (for example box IoU during
detector validation), and ``format_table``/``write_report`` present the result.
"""

from ribfrac_ray.evaluation.froc import KEY_FPS, NO_HIT, THRESHOLDS, FrocResult, froc_from_hits
from ribfrac_ray.evaluation.matching import ScanMatch, match_instances
from ribfrac_ray.evaluation.metric import EvaluationResult, ScanSummary, evaluate_folders
from ribfrac_ray.evaluation.report import format_table, write_report

__all__ = [
    "KEY_FPS",
    "NO_HIT",
    "THRESHOLDS",
    "EvaluationResult",
    "FrocResult",
    "ScanMatch",
    "ScanSummary",
    "evaluate_folders",
    "format_table",
    "froc_from_hits",
    "match_instances",
    "write_report",
]
