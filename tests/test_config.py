"""Config resolution: defaults, YAML sections, --set pairs, and the errors for mistakes."""

from pathlib import Path

import pytest

from ribfrac_ray.config import (
    ConfigError,
    PipelineConfig,
    config_to_dict,
    resolve_config,
    resolve_paths,
    save_config,
)


def test_defaults_without_overrides():
    config = resolve_config()
    assert config == PipelineConfig()


def test_yaml_then_set_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train_detector:\n  epochs: 3\n  lr: 0.01\ndetector:\n  anchor_scales: [1.0, 2.0]\n")
    config = resolve_config(str(path), ["train_detector.epochs=5", "preprocess.det_patch_size=[32,32,32]"])
    assert config.train_detector.epochs == 5
    assert config.train_detector.lr == 0.01
    assert config.detector.anchor_scales == (1.0, 2.0)
    assert config.preprocess.det_patch_size == (32, 32, 32)


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("train_detector:\n  epocs: 3\n")
    with pytest.raises(ConfigError) as error:
        resolve_config(str(path))
    assert "train_detector.epocs" in str(error.value)
    assert str(path) in str(error.value)


def test_wrong_type_is_rejected():
    with pytest.raises(ConfigError, match="must be an integer"):
        resolve_config(None, ["train_detector.epochs=many"])
    with pytest.raises(ConfigError, match="needs 3 values"):
        resolve_config(None, ["preprocess.det_patch_size=[32,32]"])


def test_saved_config_loads_back(tmp_path):
    config = resolve_config(None, ["detector.focal_gamma=1.5", "detector.anchor_shapes=[[4,4,4],[8,8,6]]"])
    save_config(config, tmp_path / "saved.yaml")
    assert resolve_config(str(tmp_path / "saved.yaml")) == config
    assert config_to_dict(config)["detector"]["anchor_shapes"] == [[4.0, 4.0, 4.0], [8.0, 8.0, 6.0]]


def test_relative_paths_resolve_under_workdir(tmp_path):
    config = resolve_paths(resolve_config(None, [f"workdir={tmp_path}", "predict.out_dir=/abs/out"]))
    assert config.preprocess.out_dir == str(tmp_path / "patches")
    assert config.predict.out_dir == "/abs/out"
    assert Path(config.predict.detector_checkpoint) == tmp_path / "models" / "detector"


@pytest.mark.parametrize(
    "pair, message",
    [
        ("window.hu_min=2000", "window.hu_min (2000) must be below window.hu_max (1000)"),
        ("train_detector.epochs=-3", "train_detector.epochs must be at least 1, got -3"),
        ("train_segmenter.batch_size=0", "train_segmenter.batch_size must be at least 1, got 0"),
        ("train_detector.lr=0", "train_detector.lr must be above 0"),
        ("preprocess.det_patch_size=[0, 64, 64]", "preprocess.det_patch_size must be at least 1 voxel"),
        ("predict.overlap=1.0", "predict.overlap must lie in [0, 1)"),
        ("predict.confidence=mean", "predict.confidence must be one of detector, detector_x_segmenter"),
        ("detector.norm=layer", "detector.norm must be one of batch, group"),
    ],
)
def test_out_of_range_value_is_rejected(pair, message):
    with pytest.raises(ConfigError) as error:
        resolve_config(None, [pair])
    assert message in str(error.value)


def test_cli_exits_2_on_out_of_range_value(tmp_path, capsys):
    from ribfrac_ray import cli

    assert cli.main(["preprocess", "--workdir", str(tmp_path), "--set", "window.hu_min=2000"]) == 2
    assert "window.hu_min (2000) must be below window.hu_max" in capsys.readouterr().err
