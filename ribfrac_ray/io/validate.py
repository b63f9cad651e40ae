"""Checks that a loaded image and label can be used, with messages that name the fix.

Each check raises :class:`~ribfrac_ray.io.nifti.VolumeError` with the file, the
offending value and what to do; callers turn it into a per-case failure record.
"""

from __future__ import annotations

import numpy as np

from ribfrac_ray.boxes import find_objects_in_memory_order

from ribfrac_ray.io.nifti import VolumeError, VolumeGeometry

# The official evaluator casts label volumes to uint8, so ids above 255 would wrap.
MAX_INSTANCES = 255
AFFINE_TOLERANCE_MM = 1e-3


def check_image(path: str, image: np.ndarray) -> None:
    """Reject images that contain NaN or infinity, or have one value everywhere."""
    if image.size == 0:
        raise VolumeError(path, "image has no voxels", "export the scan again")
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        count = int(np.size(image) - np.isfinite(image).sum())
        raise VolumeError(path, f"image has {count} NaN or infinite voxels", "replace them (for example with -1024 HU) before running")
    low, high = image.min(), image.max()
    if low == high:
        raise VolumeError(path, f"image is constant (every voxel is {low})", "check that the export contains the scan")


def check_label(
    label_path: str,
    label: np.ndarray,
    label_geometry: VolumeGeometry,
    image_path: str,
    image_geometry: VolumeGeometry,
    codes: dict[int, int] | None,
    info_csv: str = "the info CSV",
) -> np.ndarray:
    """Check a label against its image and the info CSV; return it as uint8 instance ids.

    Raises VolumeError when the shape or affine differs from the image, values are
    not integers, there are more than 255 instances, or label ids and CSV rows
    disagree (when ``codes`` is given).
    """
    if label_geometry.shape != image_geometry.shape:
        raise VolumeError(
            label_path,
            f"label shape {label_geometry.shape} differs from image shape {image_geometry.shape} ({image_path})",
            "use the label that belongs to this image",
        )
    if not np.allclose(label_geometry.affine, image_geometry.affine, atol=AFFINE_TOLERANCE_MM):
        raise VolumeError(
            label_path,
            f"label affine differs from the image affine ({image_path}) by up to "
            f"{np.abs(label_geometry.affine - image_geometry.affine).max():.4g} mm",
            "resample or re-export the label on the image grid",
        )

    if np.issubdtype(label.dtype, np.floating):
        if not np.isfinite(label).all() or not np.array_equal(label, np.round(label)):
            sample = label[np.isfinite(label) & (label != np.round(label))][:3]
            raise VolumeError(label_path, f"label has non-integer values such as {sample.tolist()}", "labels must be integer instance ids 0..n")
    low, high = float(label.min()), float(label.max())
    if low < 0:
        raise VolumeError(label_path, f"label has negative value {low:g}", "labels must be integer instance ids 0..n")
    if high > MAX_INSTANCES:
        raise VolumeError(
            label_path,
            f"label has instance id {high:g}, above the {MAX_INSTANCES} that the RibFrac format allows",
            "split the scan or merge instances so that ids stay within 1..255",
        )
    # No copy when the file already stores uint8, as RibFrac labels do.
    instances = label.astype(np.uint8, copy=False)

    if codes is not None:
        _check_ids_against_csv(label_path, instances, codes, info_csv)
    return instances


def _check_ids_against_csv(label_path: str, label: np.ndarray, codes: dict[int, int], info_csv: str) -> None:
    # find_objects makes one pass without copies. np.bincount would cast a flattened
    # copy of the volume to int64, 629 MB for 512 x 512 x 300 voxels.
    found = find_objects_in_memory_order(label)
    present = {label_id for label_id, box in enumerate(found, start=1) if box is not None}
    listed = set(codes) - {0}
    missing_rows = sorted(present - listed)
    missing_voxels = sorted(listed - present)
    if missing_rows:
        raise VolumeError(label_path, f"label ids {missing_rows} have no row in {info_csv}", "add rows for them or fix the label")
    if missing_voxels:
        raise VolumeError(label_path, f"{info_csv} lists label ids {missing_voxels} that do not occur in the label", "remove those rows or fix the label")
