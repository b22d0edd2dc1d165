import math

import pytest

from utils.schedule import learning_rate, learning_rate_factor, validate_schedule

PUBLISHED = dict(peak_lr=2e-5, min_lr=1e-7, warmup_length=1, rampdown_start=1, rampdown_stop=15)


@pytest.mark.parametrize("epoch, expected", [
    (0.0, 0.0), (0.5, 1e-5), (1.0, 2e-5),
    (8.0, 1e-7 + (2e-5 - 1e-7) * 0.5),  # half-way through the cosine
    (15.0, 1e-7), (19.9, 1e-7)])
def test_cosine_at_chosen_epochs(epoch, expected):
    assert learning_rate(epoch, rampdown_type="cosine", **PUBLISHED) == pytest.approx(expected)


def test_cosine_quarter_point():
    value = learning_rate(4.5, rampdown_type="cosine", **PUBLISHED)
    assert value == pytest.approx(1e-7 + (2e-5 - 1e-7) * 0.5 * (1 + math.cos(math.pi * 0.25)))


def test_linear_and_step():
    assert learning_rate(8.0, rampdown_type="linear", **PUBLISHED) == pytest.approx(1e-7 + (2e-5 - 1e-7) * 0.5)
    # step holds the value of the last whole epoch
    assert learning_rate(8.9, rampdown_type="step", **PUBLISHED) == learning_rate(8.0, rampdown_type="linear",
                                                                                  **PUBLISHED)


def test_plateau_between_warmup_and_rampdown():
    settings = dict(PUBLISHED, rampdown_start=3)
    assert learning_rate(2.5, rampdown_type="cosine", **settings) == 2e-5


def test_factor_is_relative_to_peak_and_counts_steps():
    assert learning_rate_factor(50, steps_per_epoch=100, rampdown_type="cosine", **PUBLISHED) == pytest.approx(0.5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rampdown_start=5, rampdown_stop=3), "rampdown_stop=3 comes before rampdown_start=5"),
    (dict(rampdown_type="exp"), "rampdown_type='exp' is not one of cosine, linear, step"),
    (dict(warmup_length=2, rampdown_start=1), "rampdown_start=1 is inside the warm-up"),
])
def test_bad_schedules(kwargs, message):
    settings = dict(warmup_length=1, rampdown_start=1, rampdown_stop=15, rampdown_type="cosine", max_epochs=20)
    with pytest.raises(ValueError, match=message):
        validate_schedule(**{**settings, **kwargs})
