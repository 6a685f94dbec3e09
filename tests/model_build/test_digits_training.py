"""examples/digits/train.py without a build (fast): the split, augmentation, factories and a
short `prepare`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.examples import load_example

torch = pytest.importorskip("torch")
train = load_example("digits")


def test_split_is_fixed_and_stratified() -> None:
    a, b = train.load_split(), train.load_split()
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert a.sizes() == {"train": 1167, "validation": 270, "test": 360}
    assert set(np.bincount(a.y_test)) <= {35, 36, 37}
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int64


def test_split_seed_is_a_parameter_and_the_default_is_the_declared_one() -> None:
    default, declared = train.load_split(), train.load_split(train.SPLIT_SEED)
    np.testing.assert_array_equal(default.x_test, declared.x_test)
    other = train.load_split(train.SPLIT_SEED + 1)
    assert other.sizes() == default.sizes()
    assert not np.array_equal(other.x_test, default.x_test)


def _images(count: int) -> Any:
    return torch.from_numpy(train.load_split().x_train[:count].copy())


def test_affine_with_no_motion_is_the_identity() -> None:
    batch = _images(16)
    out = train.affine(batch, torch.Generator().manual_seed(0), 0.0, 0.0, 0.0)
    torch.testing.assert_close(out, batch, atol=1e-4, rtol=0)


def test_augment_moves_images_reproducibly_and_keeps_their_range() -> None:
    batch = _images(64)
    first = train.augment({"pixels": batch}, torch.Generator().manual_seed(3))["pixels"]
    again = train.augment({"pixels": batch}, torch.Generator().manual_seed(3))["pixels"]
    other = train.augment({"pixels": batch}, torch.Generator().manual_seed(4))["pixels"]
    assert first.shape == (64, 64) and first.dtype == torch.float32
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert not torch.equal(first, other)
    assert not torch.allclose(first, batch, atol=0.5)
    # bilinear resampling with zero fill never leaves the 0..16 pixel range
    assert float(first.min()) >= 0.0 and float(first.max()) <= 16.0 + 1e-4
    # ink is moved, not created: a small rotation and zoom keep most of it
    ratio = first.sum(dim=1) / batch.sum(dim=1)
    assert float(ratio.median()) == pytest.approx(1.0, abs=0.25)


def test_factories_build_the_declared_models() -> None:
    split = train.load_split()
    teacher, student = train.make_teacher(), train.make_student()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert 600_000 < count(teacher) < 650_000
    assert 3_500 < count(student) < 4_000
    assert count(student) * 50 < count(teacher)
    # the student normalises with the training split's statistics; the teacher's come with
    # its weights (a state dict carries the Normalize buffers)
    assert float(student.normalize.mean) == pytest.approx(float(split.x_train.mean()))
    assert "normalize.mean" in teacher.state_dict()
    logits = student(torch.from_numpy(split.x_test[:5]))
    assert logits.shape == (5, 10)


def test_derive_seed_depends_on_the_build_seed_and_purpose() -> None:
    assert train.derive_seed(0, "teacher") == train.derive_seed(0, "teacher")
    assert train.derive_seed(0, "teacher") != train.derive_seed(1, "teacher")
    assert train.derive_seed(0, "teacher") != train.derive_seed(0, "student")


def test_prepare_writes_the_spec_outputs_and_refuses_a_weak_teacher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two epochs: the files and their shapes, not the recipe's accuracy (the zoo tests gate it).
    short = train.train_teacher
    monkeypatch.setattr(train, "train_teacher", lambda split, seed: short(split, seed, epochs=2))
    monkeypatch.setattr(train, "TEACHER_MIN_ACCURACY", 0.0)
    facts = train.prepare(tmp_path, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["teacher.pt", "train.npz", "calib.npz", "val.npz", "test.npz"]
    )
    assert facts["split"] == {"train": 1167, "validation": 270, "test": 360}
    assert 0.0 < facts["teacher_accuracy"] <= 1.0
    split = train.load_split()
    with np.load(tmp_path / "train.npz") as data:
        assert sorted(data.files) == ["labels", "pixels"]
        np.testing.assert_array_equal(data["pixels"], split.x_train)
        assert data["pixels"].dtype == np.float32 and data["labels"].dtype == np.int64
    with np.load(tmp_path / "calib.npz") as data:
        assert data.files == ["pixels"] and data["pixels"].shape == (1167, 64)
    with np.load(tmp_path / "test.npz") as data:
        np.testing.assert_array_equal(data["labels"], split.y_test)
    teacher = train.make_teacher()
    teacher.load_state_dict(torch.load(tmp_path / "teacher.pt", weights_only=True))
    assert float(teacher.normalize.std) == pytest.approx(float(split.x_train.std()))
    assert train.accuracy(teacher.eval(), split.x_test, split.y_test) == pytest.approx(
        facts["teacher_accuracy"], abs=1e-6
    )

    monkeypatch.setattr(train, "TEACHER_MIN_ACCURACY", 1.01)
    with pytest.raises(RuntimeError, match="test accuracy"):
        train.prepare(tmp_path / "again", 0)
