"""Tests for the RibFrac challenge metric on small hand-built NIfTI cases.

Every expected number is worked out by hand in the comment beside it. Recall
and FP rates carry the official EPS = 1e-8 terms, e.g. recall (tp + 1e-8) / (n + 1e-8),
so exact values are compared with an absolute tolerance of 1e-6.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from ribfrac_ray.evaluation import (
    NO_HIT,
    evaluate_folders,
    format_table,
    froc_from_hits,
    match_instances,
    write_report,
)
from ribfrac_ray.evaluation.classification import (
    GROUND_TRUTH_COLUMNS,
    PREDICTION_ROWS,
    add_scan_to_confusion,
    empty_confusion_matrix,
    macro_f1_scores,
)
from ribfrac_ray.evaluation.froc import THRESHOLDS
from ribfrac_ray.evaluation.inputs import scan_id_from_name

TOL = 1e-6
# A DICOM-like affine, so nothing relies on the identity.
AFFINE = np.array([[-0.8, 0, 0, 100.0], [0, -0.8, 0, 120.0], [0, 0, 1.25, -300.0], [0, 0, 0, 1]])


class Case:
    """Builds a ground-truth and a prediction folder in the challenge layout."""

    def __init__(self, root):
        self.gt_dir = root / "gt"
        self.pred_dir = root / "pred"
        self.gt_dir.mkdir()
        self.pred_dir.mkdir()
        self.gt_rows: list[tuple] = []
        self.pred_rows: list[tuple] = []

    def add_scan(self, public_id, gt, pred, gt_codes, predictions):
        """``gt_codes``: {label_id: code}; ``predictions``: {label_id: (confidence, code)}."""
        nib.save(nib.Nifti1Image(gt.astype(np.uint8), AFFINE), str(self.gt_dir / f"{public_id}-label.nii.gz"))
        nib.save(nib.Nifti1Image(pred.astype(np.uint8), AFFINE), str(self.pred_dir / f"{public_id}.nii.gz"))
        self.gt_rows.append((public_id, 0, 0))
        self.gt_rows.extend((public_id, label_id, code) for label_id, code in gt_codes.items())
        self.pred_rows.append((public_id, 0, 0.5, 0))
        self.pred_rows.extend((public_id, label_id, conf, code) for label_id, (conf, code) in predictions.items())

    def write_csvs(self):
        pd.DataFrame(self.gt_rows, columns=["public_id", "label_id", "label_code"]).to_csv(
            self.gt_dir / "ribfrac-val-info.csv", index=False)
        pd.DataFrame(self.pred_rows, columns=["public_id", "label_id", "confidence", "label_code"]).to_csv(
            self.pred_dir / "ribfrac-val-pred.csv", index=False)

    def evaluate(self, **kwargs):
        self.write_csvs()
        return evaluate_folders(self.gt_dir, self.pred_dir, **kwargs)


def box(shape, x, y=(0, 3), z=(0, 3), value=1, out=None):
    volume = np.zeros(shape, np.uint8) if out is None else out
    volume[x[0]:x[1], y[0]:y[1], z[0]:z[1]] = value
    return volume


# ----------------------------------------------------------------------------- detection


def test_perfect_prediction(tmp_path):
    case = Case(tmp_path)
    gt = box((12, 8, 8), (0, 3))                      # instance 1: 27 voxels
    box((12, 8, 8), (6, 8), (0, 2), (0, 2), 2, gt)    # instance 2: 8 voxels
    case.add_scan("RibFrac1", gt, gt.copy(), {1: 1, 2: 3}, {1: (0.9, 1), 2: (0.8, 3)})
    empty = np.zeros((12, 8, 8), np.uint8)
    case.add_scan("RibFrac2", empty, empty, {}, {})
    result = case.evaluate()

    froc = result.froc
    # Thresholds 0.00..0.80 keep both hits: recall (2 + e) / (2 + e) = 1.
    assert froc.sensitivities[:81] == pytest.approx(1.0, abs=TOL)
    # No false positive anywhere: (0 + e) / (2 scans + e) = 5e-9.
    assert froc.max_fps_per_scan == pytest.approx(0.0, abs=TOL)
    # Every curve point lies below each key rate, so each key takes the maximum recall, 1.
    assert froc.key_sensitivities == pytest.approx((1.0,) * 5, abs=TOL)
    assert result.average_sensitivity == pytest.approx(1.0, abs=TOL)
    assert froc.num_gt == 2
    assert froc.num_scans == 2
    # Dice 2 * 35 / (35 + 35) and IoU 35 / 35.
    assert result.dice == pytest.approx(1.0, abs=TOL)
    assert result.iou == pytest.approx(1.0, abs=TOL)


def test_duplicates_count_once(tmp_path):
    case = Case(tmp_path)
    gt = box((12, 6, 6), (0, 10), (0, 4), (0, 4))     # 10 x 4 x 4 = 160 voxels
    pred = box((12, 6, 6), (0, 3), (0, 4), (0, 4))    # 48 voxels inside the instance
    box((12, 6, 6), (6, 9), (0, 4), (0, 4), 2, pred)  # 48 more, 3 voxels apart: no contact
    case.add_scan("RibFrac1", gt, pred, {1: 2}, {1: (0.9, 2), 2: (0.6, 2)})
    result = case.evaluate()

    # Each prediction has IoU 48 / 160 = 0.3 > 0.2 with the one instance.
    assert result.scans[0].detected == 1
    assert result.scans[0].false_positives == 0
    # Recall 1 at every threshold up to 0.90, and never a false positive.
    assert result.froc.sensitivities[:91] == pytest.approx(1.0, abs=TOL)
    assert result.froc.fps_per_scan == pytest.approx(0.0, abs=TOL)


def test_touching_predictions_share_component():
    # The official rule: both predictions and the instance form one union component,
    # and the single intersection component (all 64 voxels) goes to the prediction at
    # its first voxel (0, 0, 0), i.e. prediction 1, with IoU 64 / 64.
    gt = box((6, 6, 6), (0, 4), (0, 4), (0, 4))
    pred = box((6, 6, 6), (0, 2), (0, 4), (0, 4))
    box((6, 6, 6), (2, 4), (0, 4), (0, 4), 2, pred)
    match = match_instances(gt, pred)

    assert match.max_iou[0] == pytest.approx(1.0, abs=TOL)
    assert match.hit_label.tolist() == [1, 0]
    assert match.max_iou[1] == 0.0


def test_touching_instances_lower_iou():
    # Instances 1 and 2 touch, so the union component contains both (8 + 8 voxels):
    # a prediction equal to instance 1 gets IoU 8 / 16 = 0.5, not 1.
    gt = box((6, 4, 4), (0, 2), (0, 2), (0, 2))
    box((6, 4, 4), (2, 4), (0, 2), (0, 2), 2, gt)
    pred = box((6, 4, 4), (0, 2), (0, 2), (0, 2))
    match = match_instances(gt, pred)

    assert match.max_iou[0] == pytest.approx(0.5, abs=TOL)
    assert match.hit_label.tolist() == [1]


def test_prediction_on_fracture_free_scan(tmp_path):
    case = Case(tmp_path)
    gt = box((8, 8, 8), (0, 3))
    case.add_scan("RibFrac1", gt, gt.copy(), {1: 4}, {1: (0.9, 4)})
    empty = np.zeros((8, 8, 8), np.uint8)
    case.add_scan("RibFrac2", empty, box((8, 8, 8), (4, 6)), {}, {1: (0.7, 1)})
    result = case.evaluate()

    froc = result.froc
    # Thresholds 0.00..0.69: 1 FP over 2 scans, (1 + e) / (2 + e) = 0.5; recall 1.
    assert froc.fps_per_scan[69] == pytest.approx(0.5, abs=TOL)
    assert froc.sensitivities[69] == pytest.approx(1.0, abs=TOL)
    # The 71st threshold is the float 0.7000000000000001, above the confidence 0.7,
    # so from there on the FP is gone while recall stays 1 up to 0.90.
    assert froc.fps_per_scan[70] == pytest.approx(0.0, abs=TOL)
    assert froc.sensitivities[90] == pytest.approx(1.0, abs=TOL)
    assert result.scans[1].false_positives == 1
    # The scan without fractures still adds its 18 predicted voxels: Dice 2 * 27 / (27 + 27 + 18).
    assert result.dice == pytest.approx(54 / 72, abs=TOL)
    # The FP lands in row Displaced, column FP.
    assert result.confusion_matrix[PREDICTION_ROWS.index("Displaced"), GROUND_TRUTH_COLUMNS.index("FP")] == 1


def test_empty_prediction(tmp_path):
    case = Case(tmp_path)
    gt = box((10, 8, 8), (0, 3))
    box((10, 8, 8), (5, 8), value=2, out=gt)
    case.add_scan("RibFrac1", gt, np.zeros_like(gt), {1: 1, 2: 3}, {})
    result = case.evaluate()

    froc = result.froc
    # Recall (0 + e) / (2 + e) and FP rate (0 + e) / (1 + e) at every threshold.
    assert froc.sensitivities == pytest.approx(0.0, abs=TOL)
    assert froc.fps_per_scan == pytest.approx(0.0, abs=TOL)
    assert result.average_sensitivity == pytest.approx(0.0, abs=TOL)
    assert froc.num_predictions == 0
    assert result.dice == 0.0
    # Both instances are missed: FN under Displaced and under Buckle.
    fn_row = result.confusion_matrix[PREDICTION_ROWS.index("FN")]
    assert fn_row[GROUND_TRUTH_COLUMNS.index("Displaced")] == 1
    assert fn_row[GROUND_TRUTH_COLUMNS.index("Buckle")] == 1


@pytest.mark.parametrize(("covered", "hit"), [(19, False), (20, False), (21, True)])
def test_iou_threshold_boundary(tmp_path, covered, hit):
    case = Case(tmp_path)
    gt = box((10, 10, 2), (0, 10), (0, 10), (0, 1))   # a 10 x 10 x 1 square: 100 voxels
    pred = np.zeros_like(gt)
    flat = np.argwhere(gt > 0)[:covered]             # the first voxels in C order: one connected strip
    pred[tuple(flat.T)] = 1
    case.add_scan("RibFrac1", gt, pred, {1: 2}, {1: (0.5, 2)})
    result = case.evaluate()

    # IoU = covered / 100 (the union component is the square); 0.20 is not above 0.2.
    assert match_instances(gt, pred).max_iou[0] == pytest.approx(covered / 100, abs=TOL)
    assert result.scans[0].detected == int(hit)
    assert result.froc.sensitivities[50] == pytest.approx(1.0 if hit else 0.0, abs=TOL)
    assert result.froc.fps_per_scan[50] == pytest.approx(0.0 if hit else 1.0, abs=TOL)


def test_iou_threshold_parameter(tmp_path):
    case = Case(tmp_path)
    gt = box((10, 10, 2), (0, 10), (0, 10), (0, 1))
    pred = box((10, 10, 2), (0, 1), (0, 10), (0, 1))  # 10 voxels: IoU 0.1
    case.add_scan("RibFrac1", gt, pred, {1: 2}, {1: (0.5, 2)})

    assert case.evaluate().scans[0].detected == 0
    assert case.evaluate(iou_thresh=0.05).scans[0].detected == 1


def test_confidence_thresholds():
    # One hit at confidence 0.07 is counted at thresholds 0.00..0.07 (8 points);
    # np.arange(0, 1, 0.01)[7] is exactly the float 0.07.
    froc = froc_from_hits([0.07], [5], num_gt=1, num_scans=1)
    assert froc.sensitivities[:8] == pytest.approx(1.0, abs=TOL)
    assert froc.sensitivities[8:] == pytest.approx(0.0, abs=TOL)

    # np.arange(0, 1, 0.01)[35] is 0.35000000000000003, so a confidence of 0.35 is
    # counted at thresholds 0.00..0.34 only (35 points), as in the official code.
    froc = froc_from_hits([0.35], [5], num_gt=1, num_scans=1)
    assert froc.sensitivities[:35] == pytest.approx(1.0, abs=TOL)
    assert froc.sensitivities[35] == pytest.approx(0.0, abs=TOL)

    # Confidence 0.995 passes every threshold, up to 0.99.
    froc = froc_from_hits([0.995], [5], num_gt=1, num_scans=1)
    assert froc.sensitivities == pytest.approx(1.0, abs=TOL)
    assert THRESHOLDS[-1] == pytest.approx(0.99)


def test_nan_confidence_never_counts():
    froc = froc_from_hits([np.nan, 0.3], [NO_HIT, 1], num_gt=1, num_scans=1)
    assert froc.fps_per_scan == pytest.approx(0.0, abs=TOL)
    assert froc.sensitivities[30] == pytest.approx(1.0, abs=TOL)


def test_fp_interpolation_points():
    # 2 scans, 4 instances. Hits at 0.93, 0.85, 0.65 and 0.15; false positives at
    # 0.75, 0.55, 0.45, 0.33 and twelve at 0.15. Curve (FP count / 2, hits / 4):
    #   t <= 0.15: (16 FP -> 8.0, 1.00)    0.33 < t <= 0.45: (3 -> 1.5, 0.75)
    #   0.15 < t <= 0.33: (4 -> 2.0, 0.75) 0.45 < t <= 0.55: (2 -> 1.0, 0.75)
    #   0.55 < t <= 0.65: (1 -> 0.5, 0.75) 0.65 < t <= 0.75: (1 -> 0.5, 0.50)
    #   0.75 < t <= 0.85: (0, 0.50)        0.85 < t <= 0.93: (0, 0.25), above: (0, 0)
    # With EPS, 1 FP is 0.5 + 2.5e-9, just above 0.5; 4 FP is 2 - 5e-9; 16 FP is 8 - 3.5e-8.
    confidences = [0.93, 0.85, 0.65, 0.15] + [0.75, 0.55, 0.45, 0.33] + [0.15] * 12
    hit_ids = [1, 2, 3, 4] + [NO_HIT] * 16
    froc = froc_from_hits(confidences, hit_ids, num_gt=4, num_scans=2)

    assert froc.fps_per_scan[15] == pytest.approx(8.0, abs=TOL)
    assert froc.fps_per_scan[50] == pytest.approx(1.0, abs=TOL)
    # 0.5 FP: last point at or below is (0, 0.50), first at or above is (0.5 + 2.5e-9, 0.50) -> 0.5.
    # 1 FP: a point sits exactly at 1.0 ((2 + e) / (2 + e)) with recall 0.75 -> 0.75.
    # 2 FP: between (2 - 5e-9, 0.75) and (8 - 3.5e-8, 1.0), 5e-9 of 6 along -> 0.75.
    # 4 FP: same segment, 2 of 6 along -> 0.75 + 0.25 / 3 = 0.833333.
    # 8 FP: no point at or above 8 (the highest is 8 - 3.5e-8), so the maximum recall, 1.0.
    expected = (0.5, 0.75, 0.75, 0.75 + 0.25 / 3, 1.0)
    assert froc.key_sensitivities == pytest.approx(expected, abs=TOL)
    # Mean of the five: (0.5 + 0.75 + 0.75 + 0.833333 + 1.0) / 5 = 0.766667.
    assert froc.average_sensitivity == pytest.approx(sum(expected) / 5, abs=TOL)
    assert froc.max_sensitivity == pytest.approx(1.0, abs=TOL)
    assert froc.max_fps_per_scan == pytest.approx(8.0, abs=TOL)


def test_equal_fp_rates_use_best_recall():
    # One scan, two instances: hits at 0.9 and 0.3, false positives at 0.6 and 0.1.
    # For 0.1 < t <= 0.3 and 0.3 < t <= 0.6 the rate is 1 FP per scan, with recall
    # 1.0 and 0.5. The point exactly at 1 FP therefore takes the better recall, 1.0.
    froc = froc_from_hits([0.9, 0.3, 0.6, 0.1], [1, 2, NO_HIT, NO_HIT], num_gt=2, num_scans=1)
    assert froc.key_sensitivities[1] == pytest.approx(1.0, abs=TOL)


def test_key_rate_below_curve_is_zero():
    # A false positive with confidence 1.0 survives every threshold, so the lowest
    # rate on the curve is 1 FP per scan and the 0.5 FP point has no point below it.
    froc = froc_from_hits([1.0, 0.5], [NO_HIT, 1], num_gt=1, num_scans=1)
    assert froc.key_sensitivities[0] == 0.0
    # Every point sits at exactly 1 FP, and the best recall there is 1 (t <= 0.5).
    assert froc.key_sensitivities[1] == pytest.approx(1.0, abs=TOL)


def test_no_instances_gives_recall_one():
    # The official EPS terms make recall (0 + e) / (0 + e) = 1 when nothing is annotated.
    froc = froc_from_hits([], [], num_gt=0, num_scans=3)
    assert froc.sensitivities == pytest.approx(1.0, abs=TOL)


def test_froc_rejects_bad_arguments():
    with pytest.raises(ValueError, match="one hit id per prediction"):
        froc_from_hits([0.5, 0.6], [1], num_gt=1, num_scans=1)
    with pytest.raises(ValueError, match="num_scans"):
        froc_from_hits([], [], num_gt=1, num_scans=0)
    with pytest.raises(ValueError, match="tie_order"):
        froc_from_hits([], [], num_gt=1, num_scans=1, tie_order="random")


# ----------------------------------------------------------------------------- segmentation


def test_dice_and_iou_over_scans(tmp_path):
    case = Case(tmp_path)
    shape = (8, 4, 4)
    gt = box(shape, (0, 4), (0, 4), (0, 4))            # 64 voxels
    pred = box(shape, (2, 6), (0, 4), (0, 4))          # 64 voxels, 32 shared
    case.add_scan("RibFrac1", gt, pred, {1: 2}, {1: (0.8, 2)})
    case.add_scan("RibFrac2", box(shape, (0, 2), (0, 2), (0, 2)), np.zeros(shape, np.uint8), {1: 2}, {})
    result = case.evaluate()

    # Scan 1: intersection 32, union 96. Scan 2: 8 missed voxels.
    # Dice = 2 * 32 / (72 + 64) = 0.470588; IoU = 32 / (96 + 8) = 0.307692.
    assert result.intersection_voxels == 32
    assert result.union_voxels == 104
    assert result.dice == pytest.approx(64 / 136, abs=TOL)
    assert result.iou == pytest.approx(32 / 104, abs=TOL)
    # The one prediction has IoU 32 / 96 > 0.2 with instance 1 of scan 1.
    assert result.scans[0].detected == 1


# ----------------------------------------------------------------------------- classification


def test_confusion_matrix_and_f1(tmp_path):
    case = Case(tmp_path)
    shape = (24, 8, 4)
    gt = np.zeros(shape, np.uint8)
    for label_id, x in zip((1, 2, 3, 4), (0, 5, 10, 15)):
        box(shape, (x, x + 3), value=label_id, out=gt)
    pred = np.zeros(shape, np.uint8)
    box(shape, (0, 3), value=1, out=pred)                   # on instance 1
    box(shape, (5, 8), value=2, out=pred)                   # on instance 2
    box(shape, (20, 23), (5, 8), value=3, out=pred)         # hits nothing
    box(shape, (20, 23), (0, 3), value=4, out=pred)         # hits nothing
    box(shape, (10, 13), (5, 8), value=5, out=pred)         # hits nothing, code 0
    case.add_scan(
        "RibFrac1", gt, pred,
        gt_codes={1: 1, 2: 3, 3: -1, 4: 1},
        predictions={1: (0.9, 1), 2: (0.8, 2), 3: (0.7, 4), 4: (0.6, 1), 5: (0.5, 0)},
    )
    result = case.evaluate()

    expected = pd.DataFrame(0, index=PREDICTION_ROWS, columns=GROUND_TRUTH_COLUMNS)
    expected.loc["Displaced", "Displaced"] = 1    # prediction 1
    expected.loc["Nondisplaced", "Buckle"] = 1    # prediction 2, wrong type
    expected.loc["Segmental", "FP"] = 1           # prediction 3
    expected.loc["Displaced", "FP"] = 1           # prediction 4; prediction 5 (code 0) is left out
    expected.loc["FN", "Ignore"] = 1              # instance 3 (code -1) missed
    expected.loc["FN", "Displaced"] = 1           # instance 4 missed
    assert result.confusion_matrix.tolist() == expected.to_numpy().tolist()

    # Only Displaced has a true positive: TP 1, FP 1 (the FP column), FN 1 (the FN row).
    # macro: P = R = 1/2 -> F1 0.5, mean over 4 types 0.125.
    # target-aware drops the FP column: P = 1, R = 1/2 -> F1 2/3, mean 0.166667.
    # prediction-aware also drops the FN row: P = R = 1 -> F1 1, mean 0.25.
    assert result.f1["macro_f1"] == pytest.approx(0.125, abs=TOL)
    assert result.f1["target_aware_f1"] == pytest.approx(1 / 6, abs=TOL)
    assert result.f1["prediction_aware_f1"] == pytest.approx(0.25, abs=TOL)


def test_confusion_ignores_ignore_predictions():
    matrix = empty_confusion_matrix()
    # A prediction coded -1 on instance 1 is left out, but instance 1 still counts as found.
    add_scan_to_confusion(matrix, predicted_codes=[-1], hit_labels=[1], gt_codes={0: 0, 1: 2})
    assert matrix.sum() == 0
    assert macro_f1_scores(matrix)["macro_f1"] == 0.0


# ----------------------------------------------------------------------------- inputs and errors


def test_scan_id_from_name():
    assert scan_id_from_name("RibFrac7-label.nii.gz") == "RibFrac7"
    assert scan_id_from_name("RibFrac7.nii.gz") == "RibFrac7"
    assert scan_id_from_name("RibFrac7.nii") == "RibFrac7"


def test_missing_prediction_file(tmp_path):
    case = Case(tmp_path)
    gt = box((6, 6, 6), (0, 2))
    case.add_scan("RibFrac1", gt, gt.copy(), {1: 1}, {1: (0.9, 1)})
    case.add_scan("RibFrac2", gt, gt.copy(), {1: 1}, {1: (0.9, 1)})
    (case.pred_dir / "RibFrac2.nii.gz").unlink()
    with pytest.raises(ValueError, match="no prediction in .* for RibFrac2"):
        case.evaluate()


def test_missing_csv_column(tmp_path):
    case = Case(tmp_path)
    gt = box((6, 6, 6), (0, 2))
    case.add_scan("RibFrac1", gt, gt.copy(), {1: 1}, {1: (0.9, 1)})
    case.write_csvs()
    csv_path = case.pred_dir / "ribfrac-val-pred.csv"
    pd.read_csv(csv_path).drop(columns="confidence").to_csv(csv_path, index=False)
    with pytest.raises(ValueError, match=r"ribfrac-val-pred\.csv: missing column\(s\) \['confidence'\]"):
        evaluate_folders(case.gt_dir, case.pred_dir)


def test_prediction_without_csv_row(tmp_path):
    case = Case(tmp_path)
    gt = box((6, 6, 6), (0, 2))
    pred = box((6, 6, 6), (0, 2))
    box((6, 6, 6), (4, 6), value=2, out=pred)
    case.add_scan("RibFrac1", gt, pred, {1: 1}, {1: (0.9, 1)})
    with pytest.raises(ValueError, match=r"no row for instance\(s\) \[2\] of RibFrac1"):
        case.evaluate()


def test_listed_empty_id_is_false_positive(tmp_path):
    # As in the official code, ids 1..largest id count even without voxels:
    # id 1 is listed with confidence 0.4 but absent, id 2 sits on the instance.
    case = Case(tmp_path)
    gt = box((6, 6, 6), (0, 2))
    pred = box((6, 6, 6), (0, 2), value=2)
    case.add_scan("RibFrac1", gt, pred, {1: 1}, {1: (0.4, 1), 2: (0.9, 1)})
    result = case.evaluate()

    # t <= 0.40: one FP on one scan; recall 1 up to 0.90.
    assert result.froc.fps_per_scan[40] == pytest.approx(1.0, abs=TOL)
    assert result.froc.fps_per_scan[41] == pytest.approx(0.0, abs=TOL)
    assert result.froc.sensitivities[90] == pytest.approx(1.0, abs=TOL)


def test_info_csv_beside_label_folder(tmp_path):
    gt_dir = tmp_path / "ribfrac-val-labels"
    pred_dir = tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    gt = box((6, 6, 6), (0, 2))
    nib.save(nib.Nifti1Image(gt, AFFINE), str(gt_dir / "RibFrac1-label.nii.gz"))
    nib.save(nib.Nifti1Image(gt, AFFINE), str(pred_dir / "RibFrac1.nii.gz"))
    pd.DataFrame([("RibFrac1", 0, 0), ("RibFrac1", 1, 2)], columns=["public_id", "label_id", "label_code"]).to_csv(
        tmp_path / "ribfrac-val-info.csv", index=False)
    pd.DataFrame([("RibFrac1", 0, 0.5, 0), ("RibFrac1", 1, 0.9, 2)],
                 columns=["public_id", "label_id", "confidence", "label_code"]).to_csv(pred_dir / "p.csv", index=False)

    result = evaluate_folders(gt_dir, pred_dir)
    assert result.average_sensitivity == pytest.approx(1.0, abs=TOL)


def test_shape_mismatch_names_file(tmp_path):
    case = Case(tmp_path)
    case.add_scan("RibFrac1", box((6, 6, 6), (0, 2)), box((6, 6, 5), (0, 2)), {1: 1}, {1: (0.9, 1)})
    with pytest.raises(ValueError, match=r"RibFrac1\.nii\.gz: shape \(6, 6, 5\) differs"):
        case.evaluate()


# ----------------------------------------------------------------------------- report


def test_report_files_and_table(tmp_path):
    case = Case(tmp_path)
    gt = box((8, 8, 8), (0, 3))
    case.add_scan("RibFrac1", gt, gt.copy(), {1: 1}, {1: (0.9, 1)})
    result = case.evaluate()

    metrics_path, froc_path = write_report(result, tmp_path / "report")
    assert metrics_path.name == "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    assert metrics["detection"]["average_sensitivity"] == pytest.approx(1.0, abs=TOL)
    assert metrics["detection"]["sensitivity@0.5fp"] == pytest.approx(1.0, abs=TOL)
    assert len(metrics["detection"]["fps_per_scan"]) == 100
    assert froc_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = format_table(result)
    assert "FP=0.5" in table
    assert "Dice 1.0000" in table
    assert "macro F1" in table
