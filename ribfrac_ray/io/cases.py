"""Finding RibFrac cases on disk: image/label pairs and the info CSV.

Accepted layouts, as users download or arrange them:

* official: ``<root>/ribfrac-<split>-images/RibFracN-image.nii.gz`` with
  ``ribfrac-<split>-labels/RibFracN-label.nii.gz`` and ``ribfrac-<split>-info.csv``
  (the training set ships in parts, so ``ribfrac-train-images-1``, ``...-info-1.csv``
  and nested ``Part1/`` folders are found too);
* flat: every ``*-image.nii.gz`` in one folder, with ``*-label.nii.gz`` beside it
  and an optional ``*info*.csv``.

Problems with single cases (a duplicate id, a missing label, an unsafe file name)
become :class:`CaseFailure` records, so a batch goes on with the rest.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = ("-image.nii.gz", "-image.nii")
LABEL_SUFFIXES = ("-label.nii.gz", "-label.nii")
INFO_COLUMNS = ("public_id", "label_id", "label_code")
VALID_LABEL_CODES = {-1, 0, 1, 2, 3, 4}
# Public ids become output file names, so they are limited to characters that are
# safe on every file system and cannot form a path.
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Case:
    """One scan: its id, image file, label file (None for unlabelled data) and split."""

    public_id: str
    image_path: Path
    label_path: Path | None
    split: str
    label_codes: tuple[tuple[int, int], ...] | None = None

    def codes(self) -> dict[int, int] | None:
        """Label id to label code from the info CSV.

        Empty when the split's info CSVs are readable but do not list the scan; None
        when the split has no info CSV or one of them could not be read.
        """
        return None if self.label_codes is None else dict(self.label_codes)


@dataclass(frozen=True)
class CaseFailure:
    """A scan that could not be processed, with the file and the reason."""

    public_id: str
    path: str
    reason: str
    stage: str = "discover"

    def to_dict(self) -> dict[str, str]:
        return {"public_id": self.public_id, "path": self.path, "reason": self.reason, "stage": self.stage}


@dataclass
class CaseSet:
    """Cases found in one split, the failures met while finding them, and CSV problems."""

    split: str
    cases: list[Case] = field(default_factory=list)
    failures: list[CaseFailure] = field(default_factory=list)
    info_csvs: list[Path] = field(default_factory=list)


def public_id_from_name(name: str) -> str:
    """Strip ``-image``/``-label`` and the NIfTI suffixes from a file name."""
    for suffix in IMAGE_SUFFIXES + LABEL_SUFFIXES + (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def check_public_id(public_id: str, path: Path | str) -> str | None:
    """Return a reason why ``public_id`` cannot be used as an output name, or None."""
    if SAFE_ID.match(public_id):
        return None
    return (
        f"file name gives the id {public_id!r}, which has spaces, non-ASCII letters or "
        "path characters; rename the file to use only ASCII letters, digits, '-', '_' and '.'"
    )


def find_cases(root: str | Path, split: str, require_labels: bool = True) -> CaseSet:
    """Find the images of ``split`` under ``root`` with their labels and label codes.

    ``require_labels`` makes an image without a label file a failure (for training
    and evaluation splits); without it, labels are attached where they exist.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}; run `ribfrac-ray make-phantoms --out {root}` or point --data-dir at the RibFrac download")

    image_dirs = sorted(p for p in root.glob(f"ribfrac-{split}-images*") if p.is_dir())
    label_dirs = sorted(p for p in root.glob(f"ribfrac-{split}-labels*") if p.is_dir())
    flat = not image_dirs
    if flat:
        image_dirs, label_dirs = [root], [root]
        logger.info("no ribfrac-%s-images folder in %s; reading it as a flat folder", split, root)

    result = CaseSet(split=split)
    images = _index_files(image_dirs, IMAGE_SUFFIXES, result)
    labels = _index_files(label_dirs, LABEL_SUFFIXES, result)
    codes_by_id, csv_complete = _read_info_csvs(root, split, result, flat)

    for public_id, image_path in sorted(images.items(), key=lambda item: natural_key(item[0])):
        label_path = labels.get(public_id)
        if label_path is None and require_labels:
            result.failures.append(CaseFailure(
                public_id, str(image_path),
                f"no label file {public_id}-label.nii.gz found in {', '.join(map(str, label_dirs))}; "
                "add the label or predict this split without --labels",
            ))
            continue
        codes = codes_by_id.get(public_id)
        if codes is None and csv_complete:
            # A scan that the readable info CSVs do not list gets no label codes,
            # so the label check reports each of its label ids as missing from the CSV.
            codes = {}
        result.cases.append(Case(
            public_id=public_id,
            image_path=image_path,
            label_path=label_path,
            split=split,
            label_codes=None if codes is None else tuple(sorted(codes.items())),
        ))

    logger.info("split %s: %d cases, %d failures in %s", split, len(result.cases), len(result.failures), root)
    return result


def _index_files(folders: list[Path], suffixes: tuple[str, ...], result: CaseSet) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.name.startswith(".") or not path.name.endswith(suffixes):
                continue
            public_id = public_id_from_name(path.name)
            reason = check_public_id(public_id, path)
            if reason:
                result.failures.append(CaseFailure(public_id, str(path), reason))
                continue
            if public_id in found:
                result.failures.append(CaseFailure(
                    public_id, str(path),
                    f"duplicate id {public_id!r}: also {found[public_id]}; keep one copy of each scan",
                ))
                continue
            found[public_id] = path
    return found


def _read_info_csvs(root: Path, split: str, result: CaseSet, flat: bool) -> tuple[dict[str, dict[int, int]], bool]:
    """Return the label codes by public id, and whether info CSVs exist and all were readable.

    A flat folder may name its info CSV freely; in the official layout only the
    split's own ``ribfrac-<split>-info*.csv`` counts, never another split's.
    """
    paths = sorted(root.glob(f"ribfrac-{split}-info*.csv"))
    if not paths and flat:
        paths = sorted(root.glob("*info*.csv"))
    result.info_csvs = paths
    codes: dict[str, dict[int, int]] = {}
    complete = bool(paths)
    for path in paths:
        try:
            table = read_info_csv(path)
        except ValueError as error:
            result.failures.append(CaseFailure("*", str(path), str(error), stage="info-csv"))
            complete = False
            continue
        for row in table.itertuples(index=False):
            codes.setdefault(str(row.public_id), {})[int(row.label_id)] = int(row.label_code)
    return codes, complete


def read_info_csv(path: Path) -> pd.DataFrame:
    """Read a ``public_id, label_id, label_code`` CSV; raise ValueError naming the problem."""
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a readable CSV ({error})") from error
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in INFO_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(
            f"{path}: missing required column(s) {missing}; the info CSV needs columns "
            f"{', '.join(INFO_COLUMNS)}"
        )
    for column in ("label_id", "label_code"):
        numeric = pd.to_numeric(table[column], errors="coerce")
        bad = table[numeric.isna() | (numeric != numeric.round())]
        if len(bad):
            raise ValueError(f"{path}: column {column} has non-integer values {bad[column].tolist()[:5]}")
        table[column] = numeric.astype(int)
    unknown = sorted(set(table["label_code"]) - VALID_LABEL_CODES)
    if unknown:
        raise ValueError(f"{path}: unknown label_code values {unknown}; valid codes are -1, 0, 1, 2, 3, 4")
    return table


def natural_key(text: str) -> tuple:
    """Sort key that orders RibFrac2 before RibFrac10."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))
