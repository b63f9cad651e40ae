"""Finding cases in the official RibFrac layout and in flat folders."""

import nibabel as nib
import numpy as np
import pytest

from ribfrac_ray.io.cases import find_cases, read_info_csv


def _write(path, data=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((4, 4, 4), np.int16) if data is None else data
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)


def test_official_layout_with_parts(tmp_path):
    _write(tmp_path / "ribfrac-train-images-1" / "Part1" / "RibFrac1-image.nii.gz")
    _write(tmp_path / "ribfrac-train-images-2" / "Part2" / "RibFrac2-image.nii.gz")
    _write(tmp_path / "ribfrac-train-labels-1" / "Part1" / "RibFrac1-label.nii.gz")
    _write(tmp_path / "ribfrac-train-labels-2" / "Part2" / "RibFrac2-label.nii.gz")
    (tmp_path / "ribfrac-train-info-1.csv").write_text("public_id,label_id,label_code\nRibFrac1,0,0\nRibFrac1,1,2\n")
    (tmp_path / "ribfrac-train-info-2.csv").write_text("public_id,label_id,label_code\nRibFrac2,0,0\n")

    found = find_cases(tmp_path, "train")
    assert [c.public_id for c in found.cases] == ["RibFrac1", "RibFrac2"]
    assert found.cases[0].codes() == {0: 0, 1: 2}
    assert found.failures == []


def test_flat_folder_and_natural_order(tmp_path):
    for index in (10, 2, 1):
        _write(tmp_path / f"RibFrac{index}-image.nii.gz")
    found = find_cases(tmp_path, "test", require_labels=False)
    assert [c.public_id for c in found.cases] == ["RibFrac1", "RibFrac2", "RibFrac10"]
    assert all(c.label_path is None for c in found.cases)


def test_missing_label_duplicate_and_unsafe_names_are_failures(tmp_path):
    images = tmp_path / "ribfrac-val-images"
    _write(images / "RibFrac1-image.nii.gz")
    _write(images / "sub" / "RibFrac1-image.nii.gz")
    _write(images / "RibFrac 3-image.nii.gz")
    _write(images / "RibFracé4-image.nii.gz")
    _write(tmp_path / "ribfrac-val-labels" / "RibFrac9-label.nii.gz")

    found = find_cases(tmp_path, "val")
    reasons = {f.path.split("/")[-1] + ":" + f.reason.split(" ")[0] for f in found.failures}
    assert found.cases == []
    assert any("duplicate" in f.reason for f in found.failures)
    assert any("no label file" in f.reason for f in found.failures)
    assert sum("rename the file" in f.reason for f in found.failures) == 2, reasons


def test_info_csv_without_column_is_reported(tmp_path):
    path = tmp_path / "ribfrac-train-info.csv"
    path.write_text("public_id,label_id\nRibFrac1,0\n")
    with pytest.raises(ValueError, match="label_code"):
        read_info_csv(path)
    _write(tmp_path / "ribfrac-train-images" / "RibFrac1-image.nii.gz")
    _write(tmp_path / "ribfrac-train-labels" / "RibFrac1-label.nii.gz")
    found = find_cases(tmp_path, "train")
    assert len(found.cases) == 1
    assert found.cases[0].codes() is None
    assert found.failures[0].stage == "info-csv"
    assert str(path) in found.failures[0].path


def test_missing_data_folder_says_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="make-phantoms"):
        find_cases(tmp_path / "nowhere", "train")
