"""The whole pipeline on tiny phantoms: real Ray, a real MLflow store, real NIfTI files."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from ribfrac_ray import stages, tracking
from ribfrac_ray.config import resolve_config, resolve_paths

TINY = [
    "phantoms.n_train=4",
    "phantoms.n_val=2",
    "phantoms.n_test=2",
    "phantoms.shape=[96,96,64]",
    "phantoms.spacing=[3.0,3.0,4.0]",
    "phantoms.seed=11",
    "train_detector.epochs=1",
    "train_segmenter.epochs=1",
    "predict.score_thresh=0.0",
]
STAGE_RUNS = {"make-phantoms", "preprocess", "train-detector", "train-segmenter", "predict", "evaluate"}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, ray_local):
    """Run ``demo`` once on tiny phantoms; the tests below inspect what it left."""
    workdir = tmp_path_factory.mktemp("demo")
    config = resolve_paths(resolve_config(None, [f"workdir={workdir}", *TINY]))
    uri = tracking.resolve_tracking_uri("", workdir)
    tracking.configure(uri, "pipeline-test")
    results = stages.demo_stage(config)
    return config, uri, results


def test_demo_writes_submission_in_input_layout(demo_run):
    config, _, _ = demo_run
    pred_dir = Path(config.predict.out_dir)
    label_dir = Path(config.phantoms.out) / "ribfrac-test-labels"
    labels = sorted(label_dir.glob("*-label.nii.gz"))
    assert len(labels) == 2
    for label_path in labels:
        public_id = label_path.name.replace("-label.nii.gz", "")
        truth = nib.load(label_path)
        predicted = nib.load(pred_dir / f"{public_id}.nii.gz")
        assert predicted.shape == truth.shape
        assert np.allclose(predicted.affine, truth.affine)
        assert np.asarray(predicted.dataobj).dtype == np.uint8

    table = pd.read_csv(pred_dir / "ribfrac-test-pred.csv")
    assert list(table.columns) == ["public_id", "label_id", "confidence", "label_code"]
    assert table["confidence"].between(0, 1).all()
    background = table[table.label_id == 0]
    assert sorted(background.public_id) == sorted(p.name.replace("-label.nii.gz", "") for p in labels)
    for public_id, rows in table[table.label_id > 0].groupby("public_id"):
        mask = np.asarray(nib.load(pred_dir / f"{public_id}.nii.gz").dataobj)
        assert sorted(rows.label_id) == sorted(set(np.unique(mask).tolist()) - {0})
    assert not list(pred_dir.glob(".*.tmp-*"))


def test_demo_evaluation_report(demo_run):
    config, _, results = demo_run
    evaluation = results[-1]
    assert evaluation.stage == "evaluate"
    assert "detection_average_sensitivity" in evaluation.metrics or any("sensitivity" in k for k in evaluation.metrics)
    assert (Path(config.evaluate.out_dir) / "metrics.json").is_file()
    assert (Path(config.evaluate.out_dir) / "froc.png").is_file()


def test_demo_mlflow_runs_models_and_artifacts(demo_run):
    _, uri, results = demo_run
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["pipeline-test"], output_format="list")
    parents = [r for r in runs if r.info.run_name == "demo"]
    assert len(parents) == 1
    parent_id = parents[0].info.run_id
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id}
    assert set(children) == STAGE_RUNS
    assert all(r.info.status == "FINISHED" for r in children.values())

    detector_run = children["train-detector"]
    assert "train_loss" in detector_run.data.metrics
    assert detector_run.data.params["train_detector.epochs"] == "1"
    history = mlflow.MlflowClient(uri).get_metric_history(detector_run.info.run_id, "val_froc")
    assert [m.step for m in history] == [0]

    client = mlflow.MlflowClient(uri)
    for name in ("ribfrac-detector", "ribfrac-segmenter"):
        assert client.search_model_versions(f"name = '{name}'")
    artifacts = {a.path for a in client.list_artifacts(children["predict"].info.run_id)}
    assert "ribfrac-test-pred.csv" in artifacts
    evaluation = {a.path for a in client.list_artifacts(children["evaluate"].info.run_id, "evaluation")}
    assert {"evaluation/froc.png", "evaluation/metrics.json"} <= evaluation
    checkpoint = {a.path for a in client.list_artifacts(detector_run.info.run_id, "checkpoints/detector")}
    assert "checkpoints/detector/model.safetensors" in checkpoint
    assert all(r.failures == [] for r in results)


def test_predict_skips_done_scans_and_overwrites_on_request(demo_run):
    config, _, _ = demo_run
    from ribfrac_ray.prediction.pipeline import predict

    report = predict(config.predict, config.window)
    assert report.predicted == []
    assert len(report.skipped) == 2

    from dataclasses import replace

    redo = predict(replace(config.predict, overwrite=True), config.window)
    assert sorted(redo.predicted) == sorted(report.skipped)


def test_predict_reports_bad_scan_and_finishes_rest(demo_run, tmp_path):
    config, _, _ = demo_run
    from dataclasses import replace

    from ribfrac_ray.prediction.pipeline import predict

    data = tmp_path / "data"
    images = data / "ribfrac-test-images"
    shutil.copytree(Path(config.phantoms.out) / "ribfrac-test-images", images)
    good = sorted(images.glob("*.nii.gz"))
    (images / "RibFrac99-image.nii.gz").write_bytes(good[0].read_bytes()[:500])

    report = predict(replace(config.predict, data_dir=str(data), out_dir=str(tmp_path / "out")), config.window)
    assert sorted(report.predicted) == sorted(p.name.replace("-image.nii.gz", "") for p in good)
    assert [f.public_id for f in report.failures] == ["RibFrac99"]
    assert "RibFrac99-image.nii.gz" in report.failures[0].path
    assert not (tmp_path / "out" / "RibFrac99.nii.gz").exists()
    table = pd.read_csv(tmp_path / "out" / "ribfrac-test-pred.csv")
    assert "RibFrac99" not in set(table.public_id)


def test_rerun_of_demo_resumes_without_new_epochs(demo_run):
    config, uri, _ = demo_run
    results = stages.demo_stage(config)
    detector = next(r for r in results if r.stage == "train-detector")
    assert detector.metrics["best_epoch"] == 0
