"""Reading and writing NIfTI volumes in a canonical orientation.

Inside the package every volume is indexed (x, y, z) in voxels of the closest
canonical orientation (RAS+), so the voxel axes point to +R, +A and +S in world
space. :class:`VolumeGeometry`
remembers the file's own shape and affine, so :func:`save_like` writes results back
voxel for voxel in the input's layout, whatever the scanner orientation.

Reorientation is a flip and axis permutation only (no resampling), so it is exact
and returns views rather than copies.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

try:
    from isal import igzip
except ImportError:  # pragma: no cover - isal is a dependency; nibabel's zlib reader is the fallback
    igzip = None

from ribfrac_ray.io.atomic import atomic_write_with

# Spacing outside this range (mm) is almost certainly a broken header, not a CT scan.
MIN_SPACING_MM = 0.05
MAX_SPACING_MM = 20.0


class VolumeError(ValueError):
    """A volume that cannot be used; the message names the file, the value and the fix."""

    def __init__(self, path: str | Path, reason: str, fix: str = ""):
        self.path = str(path)
        self.reason = reason
        self.fix = fix
        message = f"{path}: {reason}"
        if fix:
            message += f"; {fix}"
        super().__init__(message)


@dataclass(frozen=True)
class VolumeGeometry:
    """The file's own layout plus the flips and permutation to canonical (x, y, z).

    ``shape`` and ``affine`` are as stored in the file; ``ornt`` is nibabel's
    orientation array (3 x 2) from file axes to canonical axes.
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    ornt: np.ndarray

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        """Shape of the array after :func:`to_canonical`, in (x, y, z) voxels."""
        order = self.ornt[:, 0].astype(int)
        shape = [0, 0, 0]
        for file_axis, canonical_axis in enumerate(order):
            shape[canonical_axis] = self.shape[file_axis]
        return (shape[0], shape[1], shape[2])

    @property
    def canonical_affine(self) -> np.ndarray:
        """Voxel-to-world (mm) affine of the canonical array."""
        transform = nib.orientations.inv_ornt_aff(self.ornt, self.shape)
        return self.affine @ transform

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along canonical x, y, z."""
        sizes = np.sqrt((self.canonical_affine[:3, :3] ** 2).sum(axis=0))
        return (float(sizes[0]), float(sizes[1]), float(sizes[2]))

    def to_dict(self) -> dict[str, Any]:
        """Plain-list form, for passing through Ray Data rows and JSON."""
        return {
            "shape": list(self.shape),
            "affine": self.affine.tolist(),
            "ornt": self.ornt.tolist(),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "VolumeGeometry":
        return cls(
            shape=tuple(int(v) for v in values["shape"]),
            affine=np.asarray(values["affine"], dtype=np.float64),
            ornt=np.asarray(values["ornt"], dtype=np.float64),
        )

    @classmethod
    def from_affine(cls, shape: tuple[int, int, int], affine: np.ndarray) -> "VolumeGeometry":
        affine = np.asarray(affine, dtype=np.float64)
        ornt = nib.orientations.io_orientation(affine)
        return cls(shape=tuple(int(s) for s in shape), affine=affine, ornt=ornt)


def to_canonical(array: np.ndarray, geometry: VolumeGeometry) -> np.ndarray:
    """Reorient a file-layout array to canonical (x, y, z); returns a view."""
    return nib.orientations.apply_orientation(array, geometry.ornt)


def from_canonical(array: np.ndarray, geometry: VolumeGeometry) -> np.ndarray:
    """Reorient a canonical array back to the file's own layout; returns a view."""
    inverse = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt("RAS"), geometry.ornt
    )
    # ornt_transform(start, end) maps RAS axes onto the file axes.
    return nib.orientations.apply_orientation(array, inverse)


def load_volume(path: str | Path, kind: str = "image") -> tuple[np.ndarray, VolumeGeometry]:
    """Load a 3D NIfTI image or label in canonical (x, y, z) orientation.

    Returns the array with its on-disk dtype (int16 HU for RibFrac images, an
    integer type for labels; scaled data comes back as float32) and the geometry.
    Raises VolumeError for files that are missing, truncated, not NIfTI, not 3D,
    or whose header spacing is implausible.
    """
    path = Path(path)
    image = _open_nifti(path)
    shape = tuple(int(s) for s in image.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise VolumeError(
            path,
            f"expected a 3D {kind}, got shape {tuple(image.shape)} ({len(image.shape)}D)",
            "convert it to a single 3D volume (x, y, z) first",
        )

    geometry = VolumeGeometry.from_affine(shape, image.affine)
    _check_spacing(path, geometry)

    data = _read_data(path, image).reshape(shape)
    return to_canonical(data, geometry), geometry


def load_geometry(path: str | Path) -> VolumeGeometry:
    """Read only the header of a NIfTI file and return its geometry."""
    image = _open_nifti(Path(path))
    return VolumeGeometry.from_affine(tuple(int(s) for s in image.shape[:3]), image.affine)


def save_like(
    array: np.ndarray,
    geometry: VolumeGeometry,
    path: str | Path,
    dtype: np.dtype | type = np.uint8,
) -> None:
    """Write a canonical (x, y, z) array to ``path`` in the reference file's layout.

    The output has exactly the reference's shape and affine. The write is atomic.
    """
    if tuple(array.shape) != geometry.canonical_shape:
        raise ValueError(
            f"array shape {array.shape} does not match the canonical shape "
            f"{geometry.canonical_shape} of the reference volume for {path}"
        )
    file_array = np.ascontiguousarray(from_canonical(array, geometry)).astype(dtype, copy=False)
    image = nib.Nifti1Image(file_array, geometry.affine)
    image.header.set_data_dtype(dtype)
    image.header.set_qform(geometry.affine, code=1)
    image.header.set_sform(geometry.affine, code=1)
    atomic_write_with(Path(path), lambda temp: nib.save(image, str(temp)))


def _open_nifti(path: Path) -> nib.Nifti1Image:
    if not path.is_file():
        raise VolumeError(path, "file not found", "check the path and the file name")
    if path.stat().st_size == 0:
        raise VolumeError(path, "file is empty (0 bytes)", "download or export it again")
    try:
        image = nib.load(str(path))
    except (nib.filebasedimages.ImageFileError, gzip.BadGzipFile, EOFError, OSError, zlib.error, ValueError) as error:
        raise VolumeError(path, f"not a readable NIfTI file ({error})", "check that it is a complete .nii or .nii.gz file") from error
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise VolumeError(path, f"not a NIfTI image (nibabel read it as {type(image).__name__})", "convert it to NIfTI")
    return image


def _read_data(path: Path, image: nib.Nifti1Image) -> np.ndarray:
    try:
        proxy = image.dataobj
        slope_inter = (getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0))
        if slope_inter not in ((1.0, 0.0), (None, None)):
            return np.asarray(image.get_fdata(dtype=np.float32))
        if igzip is not None and path.name.endswith(".gz"):
            return _read_gzip_voxels(path, image)
        return np.asarray(proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else proxy)
    except (EOFError, OSError, zlib.error, ValueError) as error:
        raise VolumeError(path, f"truncated or corrupt voxel data ({error})", "download or export the file again") from error


def _read_gzip_voxels(path: Path, image: nib.Nifti1Image) -> np.ndarray:
    """Decompress the unscaled voxels of a ``.nii.gz`` with ISA-L straight into their array.

    Returns a Fortran-ordered array of the header's shape and on-disk dtype, as
    nibabel would. Decompression is most of the cost of reading a CT volume, and
    ISA-L's inflate is about three times faster than zlib's, which nibabel uses.
    """
    # The image's header copy can store vox_offset 0, but the array proxy keeps the real offset.
    proxy = image.dataobj
    data = np.empty(proxy.shape, dtype=proxy.dtype, order="F")
    # The transpose of a Fortran-ordered array is C-contiguous over the same bytes,
    # which are in NIfTI's on-disk order (first axis fastest).
    target = memoryview(data.T).cast("B")
    with igzip.open(path, "rb") as stream:
        stream.seek(int(proxy.offset))
        filled = 0
        while filled < len(target):
            count = stream.readinto(target[filled:])
            if not count:
                raise EOFError(f"the file ends after {filled} of {len(target)} bytes of voxel data")
            filled += count
    return data


def _check_spacing(path: Path, geometry: VolumeGeometry) -> None:
    spacing = geometry.spacing
    if not all(MIN_SPACING_MM <= s <= MAX_SPACING_MM for s in spacing):
        rounded = tuple(round(s, 4) for s in spacing)
        raise VolumeError(
            path,
            f"voxel spacing {rounded} mm is outside the plausible range "
            f"[{MIN_SPACING_MM}, {MAX_SPACING_MM}] mm",
            "fix the affine (pixdim / sform) in the NIfTI header",
        )
