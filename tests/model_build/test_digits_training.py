"""digits' training pieces without a build (fast): split seeds, augmentation, config checks."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from tandem.cloud.build import digits
from tandem.errors import ConfigError

torch = pytest.importorskip("torch")


def test_split_seed_is_a_parameter_and_the_default_is_the_declared_one() -> None:
    default, declared = digits.load_split(), digits.load_split(digits.SPLIT_SEED)
    np.testing.assert_array_equal(default.x_test, declared.x_test)
    other = digits.load_split(digits.SPLIT_SEED + 1)
    assert other.sizes() == default.sizes()
    assert not np.array_equal(other.x_test, default.x_test)


def _images(count: int) -> Any:
    split = digits.load_split()
    return torch.from_numpy(split.x_train[:count].copy())


def test_affine_with_no_motion_is_the_identity() -> None:
    config = dataclasses.replace(
        digits.TEACHER_TRAINING, rotate_degrees=1e-9, scale_jitter=0.0, shift_augment=False
    )
    batch = _images(16)
    out = digits._affine(batch, torch.Generator().manual_seed(0), config)
    torch.testing.assert_close(out, batch, atol=1e-4, rtol=0)


def test_affine_moves_images_reproducibly_and_keeps_their_range() -> None:
    config = dataclasses.replace(
        digits.TEACHER_TRAINING, rotate_degrees=15.0, scale_jitter=0.1, shift_augment=True
    )
    batch = _images(64)
    first = digits._affine(batch, torch.Generator().manual_seed(3), config)
    again = digits._affine(batch, torch.Generator().manual_seed(3), config)
    other = digits._affine(batch, torch.Generator().manual_seed(4), config)
    assert first.shape == (64, 64) and first.dtype == torch.float32
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert not torch.equal(first, other)
    assert not torch.allclose(first, batch, atol=0.5)
    # bilinear resampling with zero fill never leaves the 0..16 pixel range
    assert float(first.min()) >= 0.0 and float(first.max()) <= 16.0 + 1e-4
    # ink is moved, not created: a small rotation and zoom keep most of it
    ratio = first.sum(dim=1) / batch.sum(dim=1)
    assert float(ratio.median()) == pytest.approx(1.0, abs=0.25)


def test_shift_only_config_takes_the_integer_shift_path() -> None:
    config = dataclasses.replace(digits.TEACHER_TRAINING, rotate_degrees=0.0, scale_jitter=0.0)
    batch = _images(8)
    got = digits._augment(batch, torch.Generator().manual_seed(1), config)
    want = digits._shift(batch, torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    # integer shifts only move pixels: the values stay the original ones or zero
    assert set(np.unique(got.numpy())) <= set(np.unique(batch.numpy())) | {0.0}


@pytest.mark.parametrize(
    ("field", "value"),
    [("rotate_degrees", -1.0), ("rotate_degrees", 90.0), ("scale_jitter", 0.5), ("epochs", 0)],
)
def test_train_config_names_the_wrong_field(field: str, value: float) -> None:
    fields: dict[str, Any] = {field: value}
    with pytest.raises(ConfigError) as raised:
        dataclasses.replace(digits.TEACHER_TRAINING, **fields)
    assert raised.value.field == field
