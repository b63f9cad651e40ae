"""The two callable classes that Ray Data runs on actor pools.

Each actor loads its model once in ``__init__`` and then maps one volume per call
(``batch_size=1``). Rows carry small values only: paths, the geometry as JSON and
the candidate crops as ``.npy`` bytes, never whole volumes.
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import numpy as np
import torch

from ribfrac_ray.config import PredictConfig, WindowConfig
from ribfrac_ray.intensity import apply_window
from ribfrac_ray.io.nifti import VolumeError, VolumeGeometry, load_volume, save_like
from ribfrac_ray.io.validate import check_image
from ribfrac_ray.patches import crop_origin, extract_patch, grid_origins, windows_reaching
from ribfrac_ray.prediction.merge import InstanceStitcher, merge_patch_detections
from ribfrac_ray.runtime import current_node_id

logger = logging.getLogger(__name__)

AIR_HU = -1024


def array_to_bytes(array: np.ndarray) -> bytes:
    """Serialise an array as ``.npy`` bytes (keeps dtype and shape, also for zero rows)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def bytes_to_array(data: bytes) -> np.ndarray:
    """Inverse of :func:`array_to_bytes`."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def _rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    keys = list(batch)
    return [{key: batch[key][i] for key in keys} for i in range(len(batch[keys[0]]))]


def _batch(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    keys = list(rows[0]) if rows else []
    return {key: np.asarray([row[key] for row in rows], dtype=object) for key in keys}


def _set_threads(cpus: float) -> None:
    torch.set_num_threads(max(1, int(cpus)))


class DetectorActor:
    """Stage 1: RetinaNet over overlapping patches of each volume, merged with NMS.

    Output columns per volume: ``public_id``, ``image_path``, ``status`` ("ok" or
    "failed"), ``reason``, ``geometry`` (JSON), ``boxes`` and ``scores`` (JSON
    lists in canonical voxels), ``crops`` (``.npy`` bytes of float16 (n, X, Y, Z)
    windowed crops around the boxes) and ``crop_origins`` (JSON). ``node_id`` is
    the Ray node of this actor.
    """

    def __init__(self, checkpoint: str, config: dict[str, Any], window: dict[str, Any]):
        from ribfrac_ray.models.checkpoint import load_detector

        self.config = PredictConfig(**config)
        self.window = WindowConfig(**window)
        _set_threads(self.config.cpus_per_actor)
        self.device = torch.device("cuda" if self.config.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu")
        self.detector = load_detector(checkpoint)
        self.detector.to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _batch([self.process(row) for row in _rows(batch)])

    def process(self, row: dict[str, Any]) -> dict[str, Any]:
        """Detect fractures in one volume; a volume that cannot be read becomes a failed row."""
        output = {
            "public_id": str(row["public_id"]),
            "image_path": str(row["image_path"]),
            "status": "ok",
            "reason": "",
            "geometry": "{}",
            "boxes": "[]",
            "scores": "[]",
            "crops": b"",
            "crop_origins": "[]",
            "node_id": current_node_id(),
        }
        try:
            image, geometry = load_volume(output["image_path"], kind="image")
            check_image(output["image_path"], image)
        except VolumeError as error:
            logger.warning("skipping %s: %s", output["public_id"], error)
            return output | {"status": "failed", "reason": str(error)}

        try:
            boxes, scores = self.detect_volume(image)
            crops, origins = self.crops(image, boxes)
        except Exception as error:  # noqa: BLE001 - one scan must not stop the batch
            logger.exception("detection failed for %s", output["public_id"])
            return output | {"status": "failed", "reason": f"detection failed: {type(error).__name__}: {error}"}
        logger.info("%s: %d candidate boxes", output["public_id"], len(boxes))
        return output | {
            "geometry": json.dumps(geometry.to_dict()),
            "boxes": json.dumps(boxes.tolist()),
            "scores": json.dumps(scores.tolist()),
            "crops": array_to_bytes(crops),
            "crop_origins": json.dumps(origins.tolist()),
        }

    def detect_volume(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run the detector over a sliding-window grid; return merged boxes and scores."""
        from ribfrac_ray.models.detector import detect

        patch = tuple(self.config.patch_size)
        grid = grid_origins(tuple(image.shape), patch, self.config.overlap)
        origins = windows_reaching(image, grid, patch, self.config.bone_hu)
        logger.debug("detector windows: %d of %d hold bone (>= %g HU)", len(origins), len(grid), self.config.bone_hu)
        per_patch: list[tuple[np.ndarray, np.ndarray]] = []
        for start in range(0, len(origins), self.config.patch_batch_size):
            chunk = origins[start : start + self.config.patch_batch_size]
            patches = np.stack([apply_window(extract_patch(image, o, patch, fill=AIR_HU), self.window) for o in chunk])
            tensor = torch.from_numpy(patches).unsqueeze(1).to(self.device)
            per_patch.extend(detect(self.detector, tensor))
        return merge_patch_detections(per_patch, origins, self.config.nms_iou, self.config.score_thresh, self.config.max_boxes)

    def crops(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cut a fixed-size windowed crop (float16) around each box."""
        size = tuple(self.config.crop_size)
        origins = np.asarray([crop_origin(box, size, tuple(image.shape)) for box in boxes], np.int64).reshape(-1, 3)
        crops = np.zeros((len(origins), *size), np.float16)
        for index, origin in enumerate(origins):
            crops[index] = apply_window(extract_patch(image, origin, size, fill=AIR_HU), self.window)
        return crops, origins


class SegmenterActor:
    """Stage 2: U-Net on each crop, stitched into an instance mask and written as NIfTI.

    Writes ``<out_dir>/<public_id>.nii.gz`` in the input's own shape and affine and
    a record ``<out_dir>/.ribfrac-ray/<public_id>.json`` with the volume's CSV rows and node ids,
    both atomically. Output columns: ``public_id``, ``status``, ``reason``, ``rows``
    (JSON list of ``[public_id, label_id, confidence, label_code]``).
    """

    def __init__(self, checkpoint: str, config: dict[str, Any], out_dir: str):
        from ribfrac_ray.models.checkpoint import load_segmenter

        self.config = PredictConfig(**config)
        self.out_dir = out_dir
        _set_threads(self.config.cpus_per_actor)
        self.device = torch.device("cuda" if self.config.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu")
        self.segmenter = load_segmenter(checkpoint).to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _batch([self.process(row) for row in _rows(batch)])

    def process(self, row: dict[str, Any]) -> dict[str, Any]:
        """Segment one volume's crops, label instances and write the submission files."""
        public_id = str(row["public_id"])
        if row["status"] != "ok":
            return {"public_id": public_id, "status": row["status"], "reason": str(row["reason"]), "rows": "[]"}
        try:
            return self.segment(row)
        except Exception as error:  # noqa: BLE001 - one scan must not stop the batch
            logger.exception("segmentation failed for %s", public_id)
            reason = f"segmentation failed: {type(error).__name__}: {error}"
            return {"public_id": public_id, "status": "failed", "reason": reason, "rows": "[]"}

    def segment(self, row: dict[str, Any]) -> dict[str, Any]:
        """Stitch the crop probabilities of one scan, label instances, write mask and record."""
        from ribfrac_ray.prediction.records import write_record

        public_id = str(row["public_id"])

        geometry = VolumeGeometry.from_dict(json.loads(row["geometry"]))
        stitcher = InstanceStitcher(geometry.canonical_shape)
        crops = bytes_to_array(row["crops"])
        origins = np.asarray(json.loads(row["crop_origins"]), np.int64).reshape(-1, 3)
        scores = np.asarray(json.loads(row["scores"]), np.float32)
        for probability, origin, score in zip(self.probabilities(crops), origins, scores):
            stitcher.add(origin, probability, float(score), self.config.seg_threshold)

        labels, instances = stitcher.instances(self.config.seg_threshold, self.config.min_voxels, self.config.confidence)
        rows = submission_rows(public_id, instances)
        save_like(labels, geometry, f"{self.out_dir}/{public_id}.nii.gz", dtype=np.uint8)
        write_record(self.out_dir, public_id, rows, {"detector": str(row["node_id"]), "segmenter": current_node_id()})
        logger.info("%s: %d fracture instances written", public_id, len(instances))
        return {"public_id": public_id, "status": "ok", "reason": "", "rows": json.dumps(rows)}

    def probabilities(self, crops: np.ndarray) -> np.ndarray:
        """Foreground probability (n, X, Y, Z) for float16 crops (n, X, Y, Z)."""
        from ribfrac_ray.models.segmenter import foreground_probability

        if len(crops) == 0:
            return np.zeros_like(crops, dtype=np.float32)
        outputs = []
        for start in range(0, len(crops), self.config.patch_batch_size):
            tensor = torch.from_numpy(crops[start : start + self.config.patch_batch_size].astype(np.float32)).unsqueeze(1)
            outputs.append(foreground_probability(self.segmenter, tensor.to(self.device)).cpu().numpy())
        return np.concatenate(outputs)


# ``label_code`` of predicted fractures: this pipeline does not classify fracture
# types, so it writes -1, the RibFrac code for "type undefined".
PREDICTED_LABEL_CODE = -1


def submission_rows(public_id: str, instances: list[tuple[int, float]]) -> list[list[Any]]:
    """CSV rows of one scan: the background row, then one row per instance."""
    rows: list[list[Any]] = [[public_id, 0, 1.0, 0]]
    rows.extend([public_id, label_id, round(confidence, 6), PREDICTED_LABEL_CODE] for label_id, confidence in instances)
    return rows
