"""Learning-rate schedule of the training loop."""

import math

import pytest

from ribfrac_ray.training.loop import COSINE_FINAL_FRACTION, epoch_learning_rate


def test_constant_schedule_keeps_the_rate():
    config = {"lr": 2e-3, "epochs": 10, "lr_schedule": "constant"}
    assert [epoch_learning_rate(config, epoch) for epoch in range(10)] == [2e-3] * 10


def test_cosine_schedule_falls_to_final_fraction():
    config = {"lr": 2e-3, "epochs": 20, "lr_schedule": "cosine"}
    rates = [epoch_learning_rate(config, epoch) for epoch in range(20)]
    assert rates[0] == pytest.approx(2e-3)
    assert all(later < earlier for earlier, later in zip(rates, rates[1:]))
    assert rates[10] == pytest.approx(2e-3 * (1 + COSINE_FINAL_FRACTION) / 2)
    assert rates[-1] > 2e-3 * COSINE_FINAL_FRACTION
    assert epoch_learning_rate(config, 20) == pytest.approx(2e-3 * COSINE_FINAL_FRACTION)
    assert all(math.isfinite(rate) for rate in rates)


def test_resumed_epoch_gets_the_same_rate():
    # The rate is a function of the epoch only, so attempt two matches attempt one.
    config = {"lr": 1e-3, "epochs": 8, "lr_schedule": "cosine"}
    assert epoch_learning_rate(dict(config), 5) == epoch_learning_rate(config, 5)


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="unknown lr_schedule 'step'; use one of constant, cosine"):
        epoch_learning_rate({"lr": 1e-3, "epochs": 4, "lr_schedule": "step"}, 0)
