"""NIfTI reading in canonical orientation and writing back in the file's own layout."""

import gzip

import nibabel as nib
import numpy as np
import pytest

from ribfrac_ray.io.nifti import VolumeError, load_volume, save_like

AFFINES = {
    "identity": np.diag([0.7, 0.7, 1.25, 1.0]),
    "lps_flipped": np.diag([-0.7, -0.7, 1.25, 1.0]),
    "permuted": np.array([[0, 0, 2.0, 10], [-1.0, 0, 0, 20], [0, -1.5, 0, 30], [0, 0, 0, 1]]),
    "oblique_like": np.array([[0, -0.8, 0, 0], [0, 0, 1.1, 0], [-0.9, 0, 0, 0], [0, 0, 0, 1]]),
}


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_orientation_round_trip(tmp_path, name):
    affine = AFFINES[name]
    data = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    source = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), source)

    canonical, geometry = load_volume(source)
    assert nib.aff2axcodes(geometry.canonical_affine) == ("R", "A", "S")

    target = tmp_path / "mask.nii.gz"
    save_like(canonical.astype(np.uint8), geometry, target)
    written = nib.load(target)
    assert written.shape == data.shape
    assert np.allclose(written.affine, affine)
    assert np.array_equal(np.asarray(written.dataobj), data.astype(np.uint8))


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_canonical_voxel_has_same_world_position(tmp_path, name):
    affine = AFFINES[name]
    data = np.zeros((5, 6, 7), np.int16)
    data[1, 2, 3] = 100
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "scan.nii.gz")

    canonical, geometry = load_volume(tmp_path / "scan.nii.gz")
    found = np.argwhere(canonical == 100)[0]
    world_file = affine @ np.array([1, 2, 3, 1])
    world_canonical = geometry.canonical_affine @ np.append(found, 1)
    assert np.allclose(world_file, world_canonical)


def test_spacing_is_in_canonical_order(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6), np.int16), AFFINES["permuted"]), tmp_path / "a.nii.gz")
    _, geometry = load_volume(tmp_path / "a.nii.gz")
    assert geometry.spacing == pytest.approx((2.0, 1.0, 1.5))


def test_bad_files_raise_volume_error(tmp_path):
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    text = tmp_path / "text.nii.gz"
    text.write_text("not an image")
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8), np.int16), np.eye(4)), flat)
    stretched = tmp_path / "stretched.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.int16), np.diag([1.0, 1.0, 500.0, 1.0])), stretched)
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((16, 16, 16), np.int16), np.eye(4)), good)
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[:-40])

    for path, reason in [(empty, "empty"), (text, "not a readable NIfTI"), (flat, "expected a 3D"), (stretched, "spacing"), (truncated, "")]:
        with pytest.raises(VolumeError) as error:
            load_volume(path)
        assert str(path) in str(error.value)
        assert reason in str(error.value)


def test_save_like_rejects_wrong_shape(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6), np.int16), np.eye(4)), tmp_path / "a.nii.gz")
    _, geometry = load_volume(tmp_path / "a.nii.gz")
    with pytest.raises(ValueError, match="does not match"):
        save_like(np.zeros((4, 5, 7), np.uint8), geometry, tmp_path / "b.nii.gz")
    assert not (tmp_path / "b.nii.gz").exists()


@pytest.mark.parametrize("dtype", ["<i2", ">i2", "<f4", "u1"])
def test_gzip_reader_matches_nibabel(tmp_path, dtype):
    rng = np.random.default_rng(3)
    voxels = rng.integers(0, 120, size=(21, 17, 9)).astype(dtype)
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(voxels, np.diag([0.7, 0.7, 1.25, 1.0])), path)

    loaded, _ = load_volume(path)
    expected = np.asarray(nib.load(path).dataobj.get_unscaled())
    assert loaded.dtype == expected.dtype
    np.testing.assert_array_equal(loaded, expected)

    # A singleton fourth axis reads as the same 3D volume.
    single = tmp_path / "single.nii.gz"
    nib.save(nib.Nifti1Image(voxels[..., None], np.diag([0.7, 0.7, 1.25, 1.0])), single)
    np.testing.assert_array_equal(load_volume(single)[0], expected)


def test_gzip_reader_reports_missing_voxel_bytes(tmp_path):
    # A complete gzip stream that contains a full header but too few voxel bytes.
    full = tmp_path / "full.nii"
    nib.save(nib.Nifti1Image(np.ones((16, 16, 16), np.int16), np.eye(4)), full)
    short = tmp_path / "short.nii.gz"
    short.write_bytes(gzip.compress(full.read_bytes()[:-100]))
    with pytest.raises(VolumeError, match="short.nii.gz.*truncated or corrupt voxel data"):
        load_volume(short)
