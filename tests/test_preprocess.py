"""Preprocessing with Ray Data into Parquet: contents, reruns and bad volumes."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ribfrac_ray.config import PreprocessConfig, WindowConfig
from ribfrac_ray.preprocess import preprocess


@pytest.fixture
def patch_config(tiny_phantoms, tmp_path) -> PreprocessConfig:
    return PreprocessConfig(data_dir=str(tiny_phantoms), out_dir=str(tmp_path / "patches"), splits=("train",), num_tasks=2)


def test_patches_hold_boxes_inside_patch(ray_local, patch_config):
    report = preprocess(patch_config, WindowConfig())
    assert report.failures == []
    assert len(report.done["train"]) == 4

    table = ray_local.data.read_parquet(f"{patch_config.out_dir}/det/train").take_all()
    assert len(table) == report.det_patches
    size = np.asarray(patch_config.det_patch_size)
    for row in table:
        assert row["image"].shape == tuple(size)
        assert row["image"].dtype == np.float16
        assert 0.0 <= float(row["image"].min()) and float(row["image"].max()) <= 1.0
        boxes = row["boxes"][: row["n_boxes"]]
        assert (boxes[:, :3] >= 0).all() and (boxes[:, 3:] <= size).all()
        assert (boxes[:, 3:] > boxes[:, :3]).all()
    assert any(row["n_boxes"] == 0 for row in table)
    assert any(row["n_boxes"] > 0 for row in table)

    crops = ray_local.data.read_parquet(f"{patch_config.out_dir}/seg/train").take_all()
    assert len(crops) == report.seg_crops
    assert all(row["mask"].any() for row in crops)


def test_rerun_skips_then_overwrite_redoes(ray_local, patch_config):
    first = preprocess(patch_config, WindowConfig())
    det_folder = Path(patch_config.out_dir) / "det" / "train"
    files = sorted((p.name, p.stat().st_mtime_ns) for p in det_folder.iterdir())

    second = preprocess(patch_config, WindowConfig())
    assert second.done == {}
    assert sorted(second.skipped["train"]) == sorted(first.done["train"])
    assert second.det_patches == first.det_patches
    again = sorted((p.name, p.stat().st_mtime_ns) for p in det_folder.iterdir())
    assert again == files

    third = preprocess(replace(patch_config, overwrite=True), WindowConfig())
    assert sorted(third.done["train"]) == sorted(first.done["train"])
    assert third.det_patches == first.det_patches


def test_changed_settings_replace_not_append(ray_local, patch_config):
    first = preprocess(patch_config, WindowConfig())
    changed = preprocess(replace(patch_config, det_patches_per_fracture=1), WindowConfig())
    assert sorted(changed.done["train"]) == sorted(first.done["train"])
    rows = ray_local.data.read_parquet(f"{patch_config.out_dir}/det/train").count()
    assert rows == changed.det_patches
    assert changed.det_patches < first.det_patches


def test_bad_volume_is_reported_and_rest_finish(ray_local, patch_config, tiny_phantoms, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_phantoms, data)
    image = data / "ribfrac-train-images" / "RibFrac1-image.nii.gz"
    image.write_bytes(image.read_bytes()[:300])

    report = preprocess(replace(patch_config, data_dir=str(data)), WindowConfig())
    assert [f.public_id for f in report.failures] == ["RibFrac1"]
    assert str(image) in report.failures[0].path
    assert "RibFrac1" not in report.done["train"]
    assert len(report.done["train"]) == 3
    manifest = json.loads((tmp_path / "patches" / "manifest.json").read_text())
    assert manifest["failures"][0]["public_id"] == "RibFrac1"
    assert (tmp_path / "patches" / "failures.csv").is_file()
