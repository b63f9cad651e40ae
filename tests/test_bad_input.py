"""Bad scans in one batch with good ones: each fails with the file and the reason, the rest finish.

One training split, one validation split and one test split mix good phantom
scans with broken files of every kind that the input checks know. Preprocessing
and prediction run once each through the ``ribfrac-ray`` command, in this
process and on the shared local Ray instance. The tests below read what the
commands printed, wrote and logged to MLflow.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from ribfrac_ray.cli import EXIT_FAILURES, main

GOOD_TRAIN = ("RibFrac1", "RibFrac2")
GOOD_VAL = "RibFrac5"
GOOD_TEST = "RibFrac7"
INFO_COLUMNS = "public_id,label_id,label_code"

# Training scans: public id or file name -> (text the failure's path contains, text its reason contains).
TRAIN_CASES = {
    "RibFrac101": ("RibFrac101-image.nii.gz", "truncated"),
    "RibFrac102": ("RibFrac102-image.nii.gz", "empty"),
    "RibFrac103": ("RibFrac103-image.nii.gz", "not a readable NIfTI"),
    "RibFrac104": ("RibFrac104-image.nii.gz", "4D"),
    "RibFrac105": ("RibFrac105-image.nii.gz", "2D"),
    "RibFrac106": ("RibFrac106-label.nii.gz", "label shape"),
    "RibFrac107": ("RibFrac107-label.nii.gz", "label affine"),
    "RibFrac108": ("RibFrac108-label.nii.gz", "non-integer"),
    "RibFrac109": ("RibFrac109-label.nii.gz", "no row in"),
    "RibFrac110": ("RibFrac110-label.nii.gz", "do not occur in the label"),
    "RibFrac111": ("RibFrac111-image.nii.gz", "NaN"),
    "RibFrac112": ("RibFrac112-image.nii.gz", "constant"),
    "RibFrac113": ("RibFrac113-image.nii.gz", "no label file"),
    "RibFrac114": ("RibFrac114-image.nii.gz", "duplicate id"),
    "RibFrac 115": ("RibFrac 115-image.nii.gz", "rename the file"),
    "RibFracé116": ("RibFracé116-image.nii.gz", "rename the file"),
    "RibFrac117": ("RibFrac117-label.nii.gz", "above the 255"),
    "RibFrac118": ("RibFrac118-image.nii.gz", "spacing"),
    "RibFrac119": ("RibFrac119-label.nii.gz", "no row in"),
}
# Test scans for prediction, which reads images only.
TEST_CASES = {
    "RibFrac201": ("RibFrac201-image.nii.gz", "truncated"),
    "RibFrac202": ("RibFrac202-image.nii.gz", "not a readable NIfTI"),
    "RibFrac203": ("RibFrac203-image.nii.gz", "4D"),
    "RibFrac204": ("RibFrac204-image.nii.gz", "NaN"),
    "RibFrac205": ("RibFrac205-image.nii.gz", "constant"),
    "RibFrac206": ("RibFrac206-image.nii.gz", "spacing"),
    "RibFrac 207": ("RibFrac 207-image.nii.gz", "rename the file"),
}


@dataclass
class Run:
    """What one ``ribfrac-ray`` command did: exit code, printed output, MLflow run, failures."""

    code: int
    output: str
    run: mlflow.entities.Run
    failures: list[dict[str, str]]


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))


def _copy_scan(source: Path, split: str, source_id: str, target: Path, target_id: str, label: bool = True) -> None:
    kinds = ("image", "label") if label else ("image",)
    for kind in kinds:
        origin = source / f"ribfrac-{split}-{kind}s" / f"{source_id}-{kind}.nii.gz"
        destination = target / f"ribfrac-{split}-{kind}s" / f"{target_id}-{kind}.nii.gz"
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(origin, destination)


def _write_bad_train_scans(root: Path, image: nib.Nifti1Image, label: nib.Nifti1Image) -> list[str]:
    """Write the training cases of TRAIN_CASES under ``root`` and return their info CSV rows."""
    images, labels = root / "ribfrac-train-images", root / "ribfrac-train-labels"
    data = np.asarray(image.dataobj)
    instances = np.asarray(label.dataobj)
    affine = image.affine
    good_image = Path(image.get_filename()).read_bytes()
    rows = []

    def good_pair(public_id: str) -> None:
        (images / f"{public_id}-image.nii.gz").write_bytes(good_image)
        _save(labels / f"{public_id}-label.nii.gz", instances, affine)
        rows.extend(f"{public_id},{label_id},-1" for label_id in np.unique(instances))

    good_pair("RibFrac101")
    (images / "RibFrac101-image.nii.gz").write_bytes(good_image[: len(good_image) * 2 // 3])
    good_pair("RibFrac102")
    (images / "RibFrac102-image.nii.gz").write_bytes(b"")
    good_pair("RibFrac103")
    (images / "RibFrac103-image.nii.gz").write_bytes(gzip.compress(b"public_id,label_id\nRibFrac103,0\n"))
    good_pair("RibFrac104")
    _save(images / "RibFrac104-image.nii.gz", np.stack([data, data], axis=-1), affine)
    good_pair("RibFrac105")
    _save(images / "RibFrac105-image.nii.gz", data[:, :, 0], affine)
    good_pair("RibFrac106")
    _save(labels / "RibFrac106-label.nii.gz", instances[:-4], affine)
    good_pair("RibFrac107")
    shifted = affine.copy()
    shifted[:3, 3] += 5.0
    _save(labels / "RibFrac107-label.nii.gz", instances, shifted)
    good_pair("RibFrac108")
    _save(labels / "RibFrac108-label.nii.gz", instances.astype(np.float32) * 0.5, affine)
    good_pair("RibFrac109")
    rows[:] = [row for row in rows if not row.startswith("RibFrac109,") or row.startswith("RibFrac109,0,")]
    good_pair("RibFrac110")
    rows.append("RibFrac110,77,2")
    good_pair("RibFrac111")
    with_nan = data.astype(np.float32)
    with_nan[10, 10, 10] = np.nan
    _save(images / "RibFrac111-image.nii.gz", with_nan, affine)
    good_pair("RibFrac112")
    _save(images / "RibFrac112-image.nii.gz", np.full_like(data, -1000), affine)
    (images / "RibFrac113-image.nii.gz").write_bytes(good_image)
    good_pair("RibFrac114")
    (images / "copy" / "RibFrac114-image.nii.gz").parent.mkdir(parents=True, exist_ok=True)
    (images / "copy" / "RibFrac114-image.nii.gz").write_bytes(good_image)
    for name in ("RibFrac 115", "RibFracé116", ".."):
        (images / f"{name}-image.nii.gz").write_bytes(good_image)
        _save(labels / f"{name}-label.nii.gz", instances, affine)
    good_pair("RibFrac117")
    many = np.zeros(data.shape, np.int16)
    many.reshape(-1)[: 300 * 8 : 8] = np.arange(1, 301)
    _save(labels / "RibFrac117-label.nii.gz", many, affine)
    good_pair("RibFrac118")
    _save(images / "RibFrac118-image.nii.gz", data, np.diag([0.01, 0.01, 0.01, 1.0]))
    _save(labels / "RibFrac118-label.nii.gz", instances, np.diag([0.01, 0.01, 0.01, 1.0]))
    good_pair("RibFrac119")
    rows[:] = [row for row in rows if not row.startswith("RibFrac119,")]
    rows.append("../evil,1,2")
    return rows





def write_dataset(phantoms: Path, root: Path) -> None:
    """Write good phantom scans and the cases of TRAIN_CASES and TEST_CASES under ``root``."""
    for public_id in GOOD_TRAIN:
        _copy_scan(phantoms, "train", public_id, root, public_id)
    source_info = pd.read_csv(phantoms / "ribfrac-train-info.csv")
    good_rows = [f"{r.public_id},{r.label_id},{r.label_code}" for r in source_info.itertuples() if r.public_id in GOOD_TRAIN]

    image = nib.load(phantoms / "ribfrac-train-images" / "RibFrac1-image.nii.gz")
    label = nib.load(phantoms / "ribfrac-train-labels" / "RibFrac1-label.nii.gz")
    bad_rows = _write_bad_train_scans(root, image, label)
    (root / "ribfrac-train-info.csv").write_text("\n".join([INFO_COLUMNS, *good_rows, *bad_rows]) + "\n")

    # The validation split's info CSV lacks label_code. It is reported, and the
    # split is processed without the label id check.
    _copy_scan(phantoms, "val", GOOD_VAL, root, GOOD_VAL)
    (root / "ribfrac-val-info.csv").write_text(f"public_id,label_id\n{GOOD_VAL},0\n")

    _copy_scan(phantoms, "test", GOOD_TEST, root, GOOD_TEST, label=False)
    _write_bad_test_scans(root / "ribfrac-test-images", image)


def _write_bad_test_scans(images: Path, image: nib.Nifti1Image) -> None:
    data = np.asarray(image.dataobj)
    good_image = (images / f"{GOOD_TEST}-image.nii.gz").read_bytes()
    (images / "RibFrac201-image.nii.gz").write_bytes(good_image[: len(good_image) // 2])
    (images / "RibFrac202-image.nii.gz").write_text("not a NIfTI file\n")
    _save(images / "RibFrac203-image.nii.gz", np.stack([data, data], axis=-1), image.affine)
    with_nan = data.astype(np.float32)
    with_nan[0, 0, 0] = np.nan
    _save(images / "RibFrac204-image.nii.gz", with_nan, image.affine)
    _save(images / "RibFrac205-image.nii.gz", np.zeros_like(data), image.affine)
    _save(images / "RibFrac206-image.nii.gz", data, np.diag([60.0, 60.0, 60.0, 1.0]))
    for name in ("RibFrac 207", ".."):
        (images / f"{name}-image.nii.gz").write_bytes(good_image)


def run_cli(command: list[str], workdir: Path) -> Run:
    """Run ``ribfrac-ray`` in this process and return its exit code, printed output, MLflow run and failures."""
    # The store is named explicitly, because mlflow.set_tracking_uri also sets
    # MLFLOW_TRACKING_URI, which a later command in this process would pick up.
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main([*command, "--workdir", str(workdir), "--tracking-uri", uri, "--log-level", "WARNING"])

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("ribfrac-ray")
    run = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    failures: list[dict[str, str]] = []
    if any(artifact.path == "failures.json" for artifact in client.list_artifacts(run.info.run_id)):
        path = client.download_artifacts(run.info.run_id, "failures.json", str(workdir))
        failures = json.loads(Path(path).read_text())["failures"]
    return Run(code, buffer.getvalue(), run, failures)


def _matching(failures: list[dict[str, str]], public_id: str, file_name: str, reason: str) -> list[dict[str, str]]:
    return [f for f in failures if f["public_id"] == public_id and file_name in f["path"] and reason in f["reason"]]


@pytest.fixture(scope="module")
def dataset(tiny_phantoms, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-input") / "data"
    write_dataset(tiny_phantoms, root)
    return root


@pytest.fixture(scope="module")
def preprocessed(dataset, ray_local, tmp_path_factory) -> tuple[Path, Run]:
    """The work folder and the outcome of ``ribfrac-ray preprocess`` over the train and val splits."""
    workdir = tmp_path_factory.mktemp("preprocess-work")
    return workdir, run_cli(["preprocess", "--data-dir", str(dataset), "--splits", "train", "val"], workdir)


@pytest.fixture(scope="module")
def predicted(dataset, ray_local, untrained_models, tmp_path_factory) -> tuple[Path, Run]:
    """The work folder and the outcome of ``ribfrac-ray predict`` over the test split."""
    workdir = tmp_path_factory.mktemp("predict-work")
    return workdir, run_cli(_predict_command(dataset, untrained_models), workdir)


def _predict_command(dataset: Path, models: Path) -> list[str]:
    return [
        "predict", "--data-dir", str(dataset), "--split", "test",
        "--detector", str(models / "detector"), "--segmenter", str(models / "segmenter"),
    ]


@pytest.mark.parametrize("public_id", sorted(TRAIN_CASES))
def test_preprocess_reports_bad_scan(preprocessed, public_id):
    _, run = preprocessed
    file_name, reason = TRAIN_CASES[public_id]
    assert _matching(run.failures, public_id, file_name, reason), run.failures


@pytest.mark.parametrize("public_id", sorted(TRAIN_CASES))
def test_preprocess_prints_file_and_reason(preprocessed, public_id):
    _, run = preprocessed
    file_name, reason = TRAIN_CASES[public_id]
    lines = [line for line in run.output.splitlines() if line.strip().startswith(f"{public_id}:")]
    assert any(file_name in line and reason in line for line in lines), run.output


def test_preprocess_finishes_good_scans(preprocessed):
    workdir, _ = preprocessed
    markers = workdir / "patches" / "volumes"
    assert sorted(p.stem for p in (markers / "train").glob("*.json")) == sorted([*GOOD_TRAIN, "RibFrac114"])
    assert [p.stem for p in (markers / "val").glob("*.json")] == [GOOD_VAL]


def test_preprocess_uses_first_copy_of_duplicate(preprocessed):
    workdir, _ = preprocessed
    marker = json.loads((workdir / "patches" / "volumes" / "train" / "RibFrac114.json").read_text())
    assert marker["path"].endswith("ribfrac-train-images/RibFrac114-image.nii.gz")


def test_preprocess_writes_no_patches_for_bad_scans(preprocessed):
    workdir, _ = preprocessed
    written = {p.name.removesuffix(".parquet") for p in (workdir / "patches").glob("*/*/*.parquet")}
    assert written == {*GOOD_TRAIN, "RibFrac114", GOOD_VAL}


def test_preprocess_reports_info_csv_without_column(preprocessed):
    _, run = preprocessed
    failures = [f for f in run.failures if f["stage"] == "info-csv"]
    assert [Path(f["path"]).name for f in failures] == ["ribfrac-val-info.csv"]
    assert "label_code" in failures[0]["reason"]


def test_preprocess_fails_only_bad_scans(preprocessed):
    _, run = preprocessed
    assert {f["public_id"] for f in run.failures} == {*TRAIN_CASES, "*"}


def test_preprocess_logs_failures_to_mlflow(preprocessed):
    _, run = preprocessed
    assert run.run.info.run_name == "preprocess"
    assert run.run.data.metrics["failed_cases"] == len(run.failures)


def test_preprocess_writes_failures_csv(preprocessed):
    workdir, run = preprocessed
    table = pd.read_csv(workdir / "patches" / "failures.csv")
    assert len(table) == len(run.failures)
    assert set(table.public_id.astype(str)) >= set(TRAIN_CASES)


def test_preprocess_exits_zero_without_strict(preprocessed):
    _, run = preprocessed
    assert run.code == 0


def test_preprocess_strict_exits_with_failure_code(preprocessed, dataset):
    workdir, _ = preprocessed
    run = run_cli(["preprocess", "--data-dir", str(dataset), "--splits", "train", "val", "--strict"], workdir)
    assert run.code == EXIT_FAILURES
    assert run.run.data.metrics["volumes_skipped"] == len(GOOD_TRAIN) + 2


@pytest.mark.parametrize("public_id", sorted(TEST_CASES))
def test_predict_reports_bad_scan(predicted, public_id):
    _, run = predicted
    file_name, reason = TEST_CASES[public_id]
    assert _matching(run.failures, public_id, file_name, reason), run.failures


def test_predict_finishes_good_scan(predicted):
    workdir, _ = predicted
    table = pd.read_csv(workdir / "predictions" / "ribfrac-test-pred.csv")
    assert set(table.public_id) == {GOOD_TEST}
    assert sorted(p.name for p in (workdir / "predictions").glob("*.nii.gz")) == [f"{GOOD_TEST}.nii.gz"]


def test_predict_fails_only_bad_scans(predicted):
    _, run = predicted
    assert {f["public_id"] for f in run.failures} == set(TEST_CASES)


def test_predict_logs_failures_to_mlflow(predicted):
    _, run = predicted
    assert run.run.info.run_name == "predict"
    assert run.run.data.metrics["failed_cases"] == len(TEST_CASES)


def test_predict_strict_exits_with_failure_code(predicted, dataset, untrained_models):
    workdir, _ = predicted
    run = run_cli([*_predict_command(dataset, untrained_models), "--strict"], workdir)
    assert run.code == EXIT_FAILURES
    assert run.run.data.metrics["scans_skipped"] == 1


def test_ids_stay_inside_output_folders(preprocessed, predicted, dataset):
    roots = {dataset.parent.parent}
    escaped = [p for root in roots for p in root.rglob("*evil*")]
    assert escaped == []


def test_hidden_files_are_ignored(preprocessed, predicted):
    for workdir, run in (preprocessed, predicted):
        assert not [f for f in run.failures if f["public_id"] == ".."]
        assert not [p for p in workdir.rglob("..*") if p.name not in (".", "..")]
