"""Tests of the detector, anchors, segmenter and checkpoints on small synthetic patches (CPU only, about 16 s on 2 idle cores)."""

from __future__ import annotations

import json
import math
import queue
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from ribfrac_ray.config import DetectorConfig, SegmenterConfig
from ribfrac_ray.models import (
    CheckpointError,
    build_detector,
    build_segmenter,
    detect,
    detector_loss,
    detector_meta,
    expand_anchor_shapes,
    feature_strides,
    foreground_probability,
    load_detector,
    load_segmenter,
    plan_anchor_shapes,
    read_checkpoint,
    resolve_anchor_shapes,
    save_checkpoint,
    segmenter_loss,
    segmenter_meta,
    unwrap_network,
    wrap_network,
)

PATCH = (64, 64, 64)
CUBE_BOX = [20.0, 20.0, 20.0, 30.0, 30.0, 30.0]
ANCHORS = [[6.0, 6.0, 6.0], [10.0, 10.0, 10.0], [14.0, 14.0, 14.0]]


@pytest.fixture(autouse=True)
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def cube_batch() -> tuple[torch.Tensor, list[np.ndarray]]:
    """Two 64^3 patches: a bright 10^3 cube with its box, and an empty patch without boxes."""
    generator = torch.Generator().manual_seed(0)
    images = 0.1 + 0.02 * torch.randn((2, 1, *PATCH), generator=generator)
    images[0, 0, 20:30, 20:30, 20:30] = 0.9
    boxes = [np.asarray([CUBE_BOX], np.float32), np.zeros((0, 6), np.float32)]
    return images.clamp(0, 1), boxes


@pytest.fixture(scope="module")
def trained_detector():
    """The default detector after 20 Adam steps on :func:`cube_batch`, with the loss history."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    detector = build_detector(DetectorConfig(), ANCHORS, PATCH)
    optimizer = torch.optim.Adam(detector.network.parameters(), lr=1e-3)
    images, boxes = cube_batch()
    history = []
    for _ in range(20):
        loss, values = detector_loss(detector, images, boxes)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(values)
    return detector, history


# Anchors


def test_plan_anchor_shapes_two_clusters():
    rng = np.random.default_rng(1)
    small = rng.normal([5.0, 5.0, 5.0], 0.5, size=(40, 3))
    large = rng.normal([16.0, 14.0, 10.0], 0.5, size=(40, 3))
    shapes = plan_anchor_shapes(np.concatenate([small, large]), k=2)

    assert shapes.shape == (2, 3)
    np.testing.assert_allclose(shapes[0], [5.0, 5.0, 5.0], atol=0.5)
    np.testing.assert_allclose(shapes[1], [16.0, 14.0, 10.0], atol=0.5)


def test_plan_anchor_shapes_is_deterministic():
    sizes = np.random.default_rng(2).uniform(4, 16, size=(50, 3))
    np.testing.assert_array_equal(plan_anchor_shapes(sizes, 3, seed=5), plan_anchor_shapes(sizes, 3, seed=5))


def test_plan_anchor_shapes_fewer_sizes_than_k():
    sizes = np.asarray([[4.0, 4.0, 4.0], [9.0, 9.0, 9.0], [4.0, 4.0, 4.0]])
    shapes = plan_anchor_shapes(sizes, k=3)
    np.testing.assert_array_equal(shapes, [[4.0, 4.0, 4.0], [9.0, 9.0, 9.0]])


def test_plan_anchor_shapes_empty_input():
    with pytest.raises(ValueError, match="detector.anchor_shapes"):
        plan_anchor_shapes(np.zeros((0, 3)), k=3)


def test_plan_anchor_shapes_invalid_sizes():
    with pytest.raises(ValueError, match="positive"):
        plan_anchor_shapes(np.asarray([[4.0, 0.0, 4.0]]), k=1)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        plan_anchor_shapes(np.ones((4, 2)), k=1)


def test_expand_anchor_shapes():
    shapes = expand_anchor_shapes([[4, 4, 4], [8, 6, 2]], [1.0, 2.0])
    assert shapes == [[4.0, 4.0, 4.0], [8.0, 8.0, 8.0], [8.0, 6.0, 2.0], [16.0, 12.0, 4.0]]
    with pytest.raises(ValueError, match="scales"):
        expand_anchor_shapes([[4, 4, 4]], [])


def test_resolve_anchor_shapes_prefers_config():
    config = DetectorConfig(anchor_shapes=((5.0, 6.0, 7.0),), anchor_scales=(1.0, 1.5))
    shapes = resolve_anchor_shapes(config, np.full((10, 3), 20.0))
    assert shapes == [[5.0, 6.0, 7.0], [7.5, 9.0, 10.5]]


def test_resolve_anchor_shapes_plans_from_boxes():
    config = DetectorConfig(n_anchor_shapes=1)
    assert resolve_anchor_shapes(config, np.full((10, 3), 8.0)) == [[8.0, 8.0, 8.0]]


# Detector


def test_feature_strides_default():
    assert feature_strides(DetectorConfig()) == [4, 8, 16]


def test_feature_strides_without_max_pool():
    config = DetectorConfig(conv1_stride=2, max_pool=False, returned_layers=(2, 3))
    assert feature_strides(config) == [4, 8, 16]
    assert feature_strides(DetectorConfig(conv1_stride=4, max_pool=False)) == [4, 8, 16]


def test_build_detector_rejects_norm():
    with pytest.raises(ValueError, match="detector.norm"):
        build_detector(DetectorConfig(norm="layer"), ANCHORS, PATCH)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_detector_backbone_norms(norm):
    detector = build_detector(DetectorConfig(norm=norm), ANCHORS, PATCH)
    images, boxes = cube_batch()
    loss, values = detector_loss(detector, images, boxes)
    loss.backward()
    assert math.isfinite(values["loss"])


def _matched_indices(ignore: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the matched box index per anchor of the default detector on the cube patch, and the anchors."""
    detector = build_detector(DetectorConfig(ignore_centers_in_boxes=ignore), ANCHORS, PATCH)
    images, boxes = cube_batch()
    head = detector.network(images[:1])
    anchors = detector.anchor_generator(images[:1], head[detector.cls_key])
    locations = [int(level.shape[2:].numel()) for level in head[detector.cls_key]]
    targets = [{"boxes": torch.as_tensor(boxes[0]), "labels": torch.zeros(1, dtype=torch.long)}]
    return detector.compute_anchor_matched_idxs(anchors, targets, locations)[0], anchors[0]


def test_unmatched_anchors_inside_a_box_are_ignored():
    plain, anchors = _matched_indices(ignore=False)
    ignoring, _ = _matched_indices(ignore=True)

    centers = (anchors[:, :3] + anchors[:, 3:]) / 2
    box = torch.tensor(CUBE_BOX)
    inside = ((centers >= box[:3]) & (centers < box[3:])).all(dim=1)
    # The positives stay, the other anchors centred in the box leave the loss, and
    # every anchor outside the box keeps its label.
    assert torch.equal(ignoring >= 0, plain >= 0)
    assert int((plain >= 0).sum()) > 0
    assert bool((ignoring[inside & (plain < 0)] == -2).all())
    assert int((inside & (plain < 0)).sum()) > 0
    assert torch.equal(ignoring[~inside], plain[~inside])


def test_build_detector_rejects_patch_size():
    with pytest.raises(ValueError, match="divisible by 16"):
        build_detector(DetectorConfig(), ANCHORS, (64, 64, 40))


def test_build_detector_rejects_fpn_channels():
    with pytest.raises(ValueError, match="fpn_channels"):
        build_detector(DetectorConfig(fpn_channels=20), ANCHORS, PATCH)


def test_detector_training_loss_decreases(trained_detector):
    _, history = trained_detector
    losses = [values["loss"] for values in history]

    assert all(math.isfinite(loss) for loss in losses)
    assert all(values["box_loss"] >= 0 for values in history)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_detect_boxes_within_patch(trained_detector):
    detector, _ = trained_detector
    images, _ = cube_batch()
    results = detect(detector, images)

    assert len(results) == 2
    for boxes, scores in results:
        assert boxes.dtype == np.float32
        assert boxes.shape[1] == 6
        assert scores.shape == (boxes.shape[0],)
        assert np.all(boxes[:, :3] >= 0)
        assert np.all(boxes[:, 3:] <= np.asarray(PATCH))
        assert np.all(boxes[:, 3:] > boxes[:, :3])
        assert np.all((scores >= 0) & (scores <= 1))
    assert not detector.training


def test_detector_loss_without_boxes_reaches_every_parameter():
    torch.manual_seed(0)
    detector = build_detector(DetectorConfig(), ANCHORS, PATCH)
    images, _ = cube_batch()
    loss, values = detector_loss(detector, images, [np.zeros((0, 6)), np.zeros((0, 6))])
    loss.backward()

    assert math.isfinite(values["loss"])
    assert values["box_loss"] == 0.0
    missing = [name for name, parameter in detector.network.named_parameters() if parameter.grad is None]
    assert missing == []


def test_detector_loss_rejects_empty_box():
    detector = build_detector(DetectorConfig(), ANCHORS, PATCH)
    images, _ = cube_batch()
    with pytest.raises(ValueError, match="max > min"):
        detector_loss(detector, images, [np.asarray([[5, 5, 5, 5, 9, 9]]), np.zeros((0, 6))])


# Segmenter


def test_segmenter_forward_and_loss():
    config = SegmenterConfig()
    model = build_segmenter(config)
    crops = torch.rand(2, 1, 32, 32, 32)
    labels = (crops > 0.5).long()

    logits = model(crops)
    loss = segmenter_loss(config)(logits, labels)
    loss.backward()
    probability = foreground_probability(model, crops)

    assert logits.shape == (2, 2, 32, 32, 32)
    assert loss.ndim == 0
    assert math.isfinite(float(loss.detach()))
    assert probability.shape == (2, 32, 32, 32)
    assert float(probability.min()) >= 0
    assert float(probability.max()) <= 1
    assert not model.training


def test_foreground_probability_rejects_crop_size():
    model = build_segmenter(SegmenterConfig())
    with pytest.raises(ValueError, match="divisible by 4"):
        foreground_probability(model, torch.rand(1, 1, 30, 32, 32))


def test_build_segmenter_rejects_strides():
    with pytest.raises(ValueError, match="strides"):
        build_segmenter(SegmenterConfig(channels=(16, 32, 64), strides=(2,)))


# Checkpoints


def test_detector_checkpoint_round_trip(trained_detector, tmp_path):
    detector, _ = trained_detector
    images, _ = cube_batch()
    optimizer = torch.optim.AdamW(detector.network.parameters(), lr=1e-3)
    detector_loss(detector, images, cube_batch()[1])[0].backward()
    optimizer.step()
    meta = detector_meta(DetectorConfig(), ANCHORS, PATCH, epoch=3, metrics={"val_loss": np.float32(0.5)})

    save_checkpoint(tmp_path / "det", unwrap_network(detector).state_dict(), meta, optimizer.state_dict())
    restored = load_detector(tmp_path / "det")
    _, saved_meta, optimizer_state = read_checkpoint(tmp_path / "det")

    for (boxes, scores), (boxes_again, scores_again) in zip(detect(detector, images), detect(restored, images)):
        np.testing.assert_array_equal(boxes, boxes_again)
        np.testing.assert_array_equal(scores, scores_again)
    assert not restored.training
    assert saved_meta["epoch"] == 3
    assert saved_meta["metrics"] == {"val_loss": 0.5}
    assert optimizer_state is not None
    torch.optim.AdamW(restored.network.parameters(), lr=1e-3).load_state_dict(optimizer_state)


def test_segmenter_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    config = SegmenterConfig(channels=(8, 16, 32))
    model = build_segmenter(config)
    crops = torch.rand(2, 1, 32, 32, 32)

    save_checkpoint(tmp_path / "seg", model.state_dict(), segmenter_meta(config, (32, 32, 32)))
    restored = load_segmenter(tmp_path / "seg")

    assert torch.equal(foreground_probability(model, crops), foreground_probability(restored, crops))
    assert read_checkpoint(tmp_path / "seg")[2] is None


def test_save_checkpoint_strips_ddp_prefix(tmp_path):
    model = build_segmenter(SegmenterConfig(channels=(8, 16, 32)))
    wrapped_state = {f"module.{key}": value for key, value in model.state_dict().items()}
    save_checkpoint(tmp_path / "seg", wrapped_state, segmenter_meta(SegmenterConfig(channels=(8, 16, 32)), (32,) * 3))

    state_dict, _, _ = read_checkpoint(tmp_path / "seg")
    assert set(state_dict) == set(model.state_dict())


def test_load_checkpoint_errors(tmp_path):
    config = SegmenterConfig(channels=(8, 16, 32))
    save_checkpoint(tmp_path / "seg", build_segmenter(config).state_dict(), segmenter_meta(config, (32,) * 3))

    with pytest.raises(FileNotFoundError, match="not found"):
        read_checkpoint(tmp_path / "absent")
    with pytest.raises(CheckpointError, match="contains a segmenter, expected a detector"):
        load_detector(tmp_path / "seg")
    with pytest.raises(CheckpointError, match="missing anchor_shapes"):
        save_checkpoint(tmp_path / "bad", {}, {"kind": "detector", "config": {}, "patch_size": [64] * 3})

    (tmp_path / "seg" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"seg is missing model\.safetensors"):
        read_checkpoint(tmp_path / "seg")


def test_load_checkpoint_rejects_other_weights(tmp_path):
    small, large = SegmenterConfig(channels=(8, 16, 32)), SegmenterConfig(channels=(16, 32, 64))
    save_checkpoint(tmp_path / "seg", build_segmenter(large).state_dict(), segmenter_meta(small, (32,) * 3))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_segmenter(tmp_path / "seg")


def test_meta_json_is_readable(tmp_path):
    config = SegmenterConfig(channels=(8, 16, 32))
    save_checkpoint(tmp_path / "seg", build_segmenter(config).state_dict(), segmenter_meta(config, (32,) * 3))
    meta = json.loads((tmp_path / "seg" / "meta.json").read_text())
    assert meta["kind"] == "segmenter"
    assert meta["config"]["channels"] == [8, 16, 32]
    assert meta["crop_size"] == [32, 32, 32]


# Distributed data parallel


def _ddp_worker(rank: int, world_size: int, init_file: str, results) -> None:
    """Train a small wrapped detector for 2 steps; rank 1 gets only patches without boxes."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        config = DetectorConfig(block_inplanes=(8, 16, 32, 64), fpn_channels=16)
        detector = wrap_network(build_detector(config, [[8.0, 8.0, 8.0]], (32, 32, 32)), DistributedDataParallel)
        optimizer = torch.optim.SGD(detector.network.parameters(), lr=0.01)

        torch.manual_seed(rank)
        images = torch.rand(2, 1, 32, 32, 32)
        boxes = [np.zeros((0, 6)), np.zeros((0, 6))]
        if rank == 0:
            boxes[0] = np.asarray([[4.0, 4.0, 4.0, 12.0, 12.0, 12.0]])
        for _ in range(2):
            loss, _ = detector_loss(detector, images, boxes)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        flat = torch.cat([parameter.detach().flatten() for parameter in detector.network.parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(world_size)]
        dist.all_gather(gathered, flat)
        detections = detect(detector, images)
        keys = list(unwrap_network(detector).state_dict())
        results.put(
            {
                "rank": rank,
                "max_parameter_difference": float((gathered[0] - gathered[1]).abs().max()),
                "detections": len(detections),
                "prefixed_keys": sum(key.startswith("module.") for key in keys),
            }
        )
    except Exception as error:  # reported to the test process, which fails with it
        results.put({"rank": rank, "error": repr(error)})
    finally:
        dist.destroy_process_group()


def test_ddp_wrapped_network_trains(tmp_path):
    world_size = 2
    context = mp.get_context("spawn")
    results = context.Queue()
    init_file = str(Path(tmp_path) / "ddp_init")
    processes = [
        context.Process(target=_ddp_worker, args=(rank, world_size, init_file, results)) for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    try:
        reports = [results.get(timeout=120) for _ in range(world_size)]
    except queue.Empty:
        reports = []
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()

    assert len(reports) == world_size, "a DDP worker did not report within 120 s"
    for report in reports:
        assert "error" not in report, report
        assert report["max_parameter_difference"] == 0.0
        assert report["detections"] == 2
        assert report["prefixed_keys"] == 0
