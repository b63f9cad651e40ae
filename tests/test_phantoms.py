"""Tests for the phantom generator: file layout, labels against the info CSV, determinism."""

from __future__ import annotations

import dataclasses

import cc3d
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from ribfrac_ray.config import ConfigError, PhantomConfig
from ribfrac_ray.io.nifti import load_volume
from ribfrac_ray.phantoms import generate_phantom, make_phantoms

# Same field of view as the default config (282 x 282 x 240 mm) at half the voxels
# per axis, so anatomy and fractures look the same and the data set writes fast.
SMALL = PhantomConfig(
    shape=(64, 64, 48),
    spacing=(4.4, 4.4, 5.0),
    n_train=3,
    n_val=2,
    n_test=2,
    max_fractures=3,
    no_fracture_fraction=0.34,  # rounds to 1 scan in each split
    seed=7,
)
DEFAULT_SHAPE = PhantomConfig().shape
DEFAULT_SPACING = PhantomConfig().spacing
VALID_CODES = {-1, 1, 2, 3, 4}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    config = dataclasses.replace(SMALL, out=str(out))
    return config, make_phantoms(config)


def read_split(config, split):
    """Return {public_id: (image, label, image file, csv rows)} for one split."""
    root = config.out
    table = pd.read_csv(f"{root}/ribfrac-{split}-info.csv")
    scans = {}
    for public_id, rows in table.groupby("public_id"):
        image_file = nib.load(f"{root}/ribfrac-{split}-images/{public_id}-image.nii.gz")
        label_file = nib.load(f"{root}/ribfrac-{split}-labels/{public_id}-label.nii.gz")
        scans[public_id] = (image_file, label_file, rows)
    return table, scans


def test_ids_continue_across_splits(dataset):
    _, written = dataset
    assert written == {
        "train": ["RibFrac1", "RibFrac2", "RibFrac3"],
        "val": ["RibFrac4", "RibFrac5"],
        "test": ["RibFrac6", "RibFrac7"],
    }


def test_labels_match_info_csv(dataset):
    config, written = dataset
    for split, ids in written.items():
        table, scans = read_split(config, split)
        assert list(table.columns) == ["public_id", "label_id", "label_code"]
        assert sorted(scans) == sorted(ids)
        for public_id, (_, label_file, rows) in scans.items():
            label = np.asarray(label_file.dataobj)
            in_volume = set(np.unique(label).tolist()) - {0}
            in_csv = set(rows["label_id"]) - {0}
            assert in_volume == in_csv, public_id
            assert in_volume == set(range(1, len(in_volume) + 1)), public_id
            background = rows[rows["label_id"] == 0]
            assert background["label_code"].tolist() == [0], public_id
            assert set(rows.loc[rows["label_id"] > 0, "label_code"]) <= VALID_CODES, public_id


def test_file_types_and_orientation(dataset):
    config, written = dataset
    public_id = written["val"][0]
    image_file = nib.load(f"{config.out}/ribfrac-val-images/{public_id}-image.nii.gz")
    label_file = nib.load(f"{config.out}/ribfrac-val-labels/{public_id}-label.nii.gz")

    assert image_file.get_data_dtype() == np.int16
    assert label_file.get_data_dtype() == np.uint8
    assert image_file.shape == config.shape
    assert not np.allclose(image_file.affine, np.eye(4))
    # DICOM-derived orientation: file axes point left, posterior, superior.
    assert nib.aff2axcodes(image_file.affine) == ("L", "P", "S")
    assert np.allclose(np.abs(np.diag(image_file.affine)[:3]), config.spacing)
    np.testing.assert_array_equal(image_file.affine, label_file.affine)

    image, geometry = load_volume(f"{config.out}/ribfrac-val-images/{public_id}-image.nii.gz")
    assert image.shape == config.shape
    assert geometry.spacing == pytest.approx(config.spacing)


def test_fracture_free_scans_exist(dataset):
    config, written = dataset
    for split in written:
        _, scans = read_split(config, split)
        empty = [public_id for public_id, (_, label_file, rows) in scans.items()
                 if rows["label_id"].tolist() == [0] and not np.asarray(label_file.dataobj).any()]
        assert len(empty) == 1, split


def test_same_seed_same_files(dataset, tmp_path):
    config, _ = dataset
    make_phantoms(dataclasses.replace(config, out=str(tmp_path)))
    for public_id in ("RibFrac1", "RibFrac2", "RibFrac3"):
        for kind in ("image", "label"):
            folder = f"ribfrac-train-{kind}s/{public_id}-{kind}.nii.gz"
            first = np.asarray(nib.load(f"{config.out}/{folder}").dataobj)
            second = np.asarray(nib.load(f"{tmp_path}/{folder}").dataobj)
            np.testing.assert_array_equal(first, second)


def test_generate_phantom_deterministic():
    first = generate_phantom(SMALL.shape, SMALL.spacing, np.random.default_rng([3, 1]), 3, False)
    second = generate_phantom(SMALL.shape, SMALL.spacing, np.random.default_rng([3, 1]), 3, False)
    other = generate_phantom(SMALL.shape, SMALL.spacing, np.random.default_rng([4, 1]), 3, False)

    assert first[0].tobytes() == second[0].tobytes()
    assert first[1].tobytes() == second[1].tobytes()
    assert first[2] == second[2]
    assert first[0].tobytes() != other[0].tobytes()


def test_overwrite_rejected(dataset):
    config, _ = dataset
    with pytest.raises(FileExistsError, match=r"ribfrac-train-images already contains .*--overwrite"):
        make_phantoms(config)


def test_overwrite_replaces_and_removes_stale(tmp_path):
    config = dataclasses.replace(SMALL, out=str(tmp_path), n_train=2, n_val=1, n_test=0)
    make_phantoms(config)
    smaller = dataclasses.replace(config, n_train=1, overwrite=True)
    written = make_phantoms(smaller)

    assert written["val"] == ["RibFrac2"]
    images = sorted(p.name for p in (tmp_path / "ribfrac-train-images").iterdir())
    assert images == ["RibFrac1-image.nii.gz"]
    assert (tmp_path / "ribfrac-val-images" / "RibFrac2-image.nii.gz").is_file()


def test_overwrite_needs_phantom_marker(tmp_path):
    folder = tmp_path / "ribfrac-train-images"
    folder.mkdir()
    (folder / "RibFrac1-image.nii.gz").write_bytes(b"real data")
    config = dataclasses.replace(SMALL, out=str(tmp_path), overwrite=True)
    with pytest.raises(FileExistsError, match="phantoms.json"):
        make_phantoms(config)
    assert (folder / "RibFrac1-image.nii.gz").read_bytes() == b"real data"


@pytest.mark.parametrize("seed", range(4))
def test_default_size_fractures(seed):
    image, label, codes = generate_phantom(DEFAULT_SHAPE, DEFAULT_SPACING, np.random.default_rng([2020, seed]), 4, False)

    assert image.dtype == np.int16
    assert label.dtype == np.uint8
    assert image.shape == label.shape == DEFAULT_SHAPE
    assert 1 <= len(codes) <= 4
    assert set(codes.values()) <= VALID_CODES
    assert set(np.unique(label).tolist()) == {0, *codes}
    # Blobs that touched would merge into fewer 26-connected components.
    assert cc3d.connected_components(label > 0, connectivity=26, return_N=True)[1] == len(codes)

    for label_id in codes:
        voxels = np.argwhere(label == label_id)
        extent = voxels.max(axis=0) - voxels.min(axis=0) + 1
        assert extent.min() >= 4, (label_id, extent)
        assert extent.max() <= 16, (label_id, extent)
        # The blob contains both rib bone and the soft tissue of the break.
        values = image[label == label_id]
        assert (values > 400).any(), label_id
        assert (values < 150).any(), label_id


def test_default_size_tissues():
    image, _, _ = generate_phantom(DEFAULT_SHAPE, DEFAULT_SPACING, np.random.default_rng([2020, 0]), 2, False)
    assert image.min() >= -1024
    assert np.median(image[:3, :3, :]) < -900           # air in the corner
    middle = image[:, :, DEFAULT_SHAPE[2] // 2]
    assert (middle < -700).mean() > 0.15                 # lungs and air
    assert (middle > 600).any()                          # rib cortex


def test_fracture_free_phantom():
    image, label, codes = generate_phantom(SMALL.shape, SMALL.spacing, np.random.default_rng(0), 0, True)
    assert codes == {}
    assert not label.any()
    assert image.shape == SMALL.shape


def test_invalid_arguments():
    with pytest.raises(ValueError, match="max_fractures"):
        generate_phantom(SMALL.shape, SMALL.spacing, np.random.default_rng(0), 0, False)
    with pytest.raises(ConfigError, match="spacing"):
        generate_phantom(SMALL.shape, (0.0, 1.0, 1.0), np.random.default_rng(0), 1, False)
    with pytest.raises(ConfigError, match="no_fracture_fraction"):
        make_phantoms(dataclasses.replace(SMALL, no_fracture_fraction=1.5))
