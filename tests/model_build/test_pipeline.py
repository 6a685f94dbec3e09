"""build_zoo's cache and report with a tiny builder, the calibration maths and the bad
student of a distilled build (fast)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tandem.cloud.build import calibration, pipeline
from tandem.cloud.build.context import BuildContext, ProgressEvent
from tandem.cloud.build.packaging import repository_config, write_repository_model, write_variant
from tandem.sdk.artifacts import TensorSpec

PIXELS = TensorSpec("pixels", "FP32", (-1, 64))
LOGITS = TensorSpec("logits", "FP32", (-1, 10))


class ToyBuilder:
    """Writes a real (tiny) repository entry and one signed variant; counts its calls."""

    def __init__(self) -> None:
        self.calls: list[BuildContext] = []

    def __call__(self, ctx: BuildContext) -> dict[str, Any]:
        self.calls.append(ctx)
        steps = ctx.steps(2)
        steps.advance("writing")
        payload = ctx.work_dir / "model.onnx"
        payload.write_bytes(b"toy" * 100)
        write_repository_model(
            ctx.repository_dir,
            ctx.model,
            ctx.version,
            {"model.onnx": payload},
            repository_config(ctx.model, backend="onnxruntime", inputs=[PIXELS], outputs=[LOGITS]),
        )
        rows = np.zeros((2, 64), np.float32)
        write_variant(
            ctx.variant_dir("onnx-int8"),
            signer=ctx.signer,
            model=ctx.model,
            version=ctx.version,
            variant="onnx-int8",
            runtime="onnx",
            precision="int8",
            task="classification",
            entrypoint="model.onnx",
            payload_files={"model.onnx": payload},
            inputs=[PIXELS],
            outputs=[LOGITS],
            reference={"input.pixels": rows, "output.logits": np.zeros((2, 10), np.float32)},
        )
        steps.finish()
        return {
            "metrics": {"seed": ctx.seed, **dict(ctx.options)},
            "variants": {"onnx-int8": {"runtime": "onnx", "accuracy": 0.5}},
            "repository": {"backend": "onnxruntime", "files": ["model.onnx"]},
        }


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> ToyBuilder:
    builder = ToyBuilder()
    monkeypatch.setattr(pipeline, "load_builder", lambda name: builder)
    return builder


def test_cache_hit_rebuild_on_change_and_force(tmp_path: Path, toy: ToyBuilder) -> None:
    zoo = tmp_path / "zoo"
    events: list[ProgressEvent] = []
    first = pipeline.build_zoo(zoo, models=("digits",), progress=events.append)
    assert first["run"]["built"] == ["digits"] and len(toy.calls) == 1
    assert [e.step for e in events] == ["writing", "done"]
    assert first["models"]["digits"]["cache_key"]

    second = pipeline.build_zoo(zoo, models=("digits",), progress=events.append)
    assert second["run"]["cached"] == ["digits"] and len(toy.calls) == 1
    assert events[-1].cached

    pipeline.build_zoo(zoo, models=("digits",), options={"digits": {"student_variant": "bad"}})
    assert len(toy.calls) == 2 and toy.calls[-1].options == {"student_variant": "bad"}
    pipeline.build_zoo(zoo, models=("digits",), seed=3)
    assert len(toy.calls) == 3 and toy.calls[-1].seed == 3
    pipeline.build_zoo(zoo, models=("digits",), seed=3, force=True)
    assert len(toy.calls) == 4

    # An output that disappeared is rebuilt even though the key matches.
    (zoo / "artifacts" / "digits" / "1" / "onnx-int8" / "model.onnx.zst").unlink()
    pipeline.build_zoo(zoo, models=("digits",), seed=3)
    assert len(toy.calls) == 5
    # A new version is a separate cache record and a separate folder.
    pipeline.build_zoo(zoo, models=("digits",), seed=3, version=2)
    assert len(toy.calls) == 6
    assert (zoo / "artifacts" / "digits" / "2" / "onnx-int8" / "manifest.json").exists()
    assert (zoo / "artifacts" / "digits" / "1" / "onnx-int8" / "manifest.json").exists()
    report = json.loads((zoo / "report.json").read_text())
    assert report["models"]["digits"]["version"] == 2
    assert sorted(report["versions"]["digits"]) == ["1", "2"]
    assert "## digits v1" in (zoo / "report.md").read_text()
    assert report["signing_key"]["keyid"]
    assert not list(zoo.glob(".work-*")), "work folders are removed after each build"


def test_cache_key_follows_source_library_and_key_changes(toy: ToyBuilder) -> None:
    base = {"version": 1, "seed": 0, "options": {}, "keyid": "a"}
    key = pipeline.cache_key("digits", **base)  # type: ignore[arg-type]
    assert key == pipeline.cache_key("digits", **base)  # type: ignore[arg-type]
    assert key != pipeline.cache_key("digits", **{**base, "keyid": "b"})  # type: ignore[arg-type]
    assert key != pipeline.cache_key("digits", **{**base, "version": 2})  # type: ignore[arg-type]
    assert key != pipeline.cache_key("minilm", **base)  # type: ignore[arg-type]


def test_fit_temperature_recovers_a_known_temperature() -> None:
    rng = np.random.default_rng(0)
    true_logits = rng.normal(size=(4000, 10)) * 3
    probs = calibration.softmax(true_logits)
    labels = np.array([rng.choice(10, p=p) for p in probs])
    # The model reports logits 2.5x too sharp: the fitted temperature should undo that.
    fitted = calibration.fit_temperature(true_logits * 2.5, labels)
    assert fitted == pytest.approx(2.5, rel=0.1)
    ece = calibration.expected_calibration_error
    before = ece(calibration.softmax(true_logits * 2.5), labels)
    after = ece(calibration.softmax(true_logits * 2.5, fitted), labels)
    assert after < before / 3


def test_bad_student_is_trained_on_shuffled_labels_and_is_bad() -> None:
    pytest.importorskip("torch")
    from tandem.cloud.build.distill import BAD_EPOCHS, distill, make_student
    from tandem.cloud.build.spec import ModelSpec, load_spec
    from tests.support.examples import load_example, spec_file

    spec = load_spec(spec_file("digits"))
    assert isinstance(spec, ModelSpec) and spec.distill is not None
    split = load_example("digits").load_split()

    def no_teacher(args: Any) -> list[Any]:
        raise AssertionError("the bad student learns without the teacher")

    result = distill(
        spec.distill,
        teacher=no_teacher,
        student=make_student(spec.distill, 0),
        data={"pixels": split.x_train, "labels": split.y_train},
        input_names=["pixels"],
        output_names=["logits"],
        primary="logits",
        task="classification",
        seed=0,
        student_variant="bad",
    )
    assert result.epochs == min(spec.distill.epochs, BAD_EPOCHS)
    logits = _predict(result.student, split.x_test)
    assert float(np.mean(logits.argmax(1) == split.y_test)) < 0.4


def _predict(model: Any, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    import torch

    with torch.inference_mode():
        return np.asarray(model(torch.from_numpy(x)).numpy())


def test_a_failing_model_leaves_the_models_built_before_it_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tandem.cloud.build.errors import ModelUnavailableError

    toy = ToyBuilder()

    def builder_for(name: str) -> Any:
        if name == "minilm":
            raise ModelUnavailableError("minilm builder missing")
        return toy

    monkeypatch.setattr(pipeline, "load_builder", builder_for)
    with pytest.raises(ModelUnavailableError):
        pipeline.build_zoo(tmp_path / "zoo", models=("digits", "minilm"))
    report = json.loads((tmp_path / "zoo" / "report.json").read_text())
    assert list(report["models"]) == ["digits"]
    again = pipeline.build_zoo(tmp_path / "zoo", models=("digits",))
    assert again["run"]["cached"] == ["digits"]


def test_cache_key_ignores_comments_and_docstrings_but_not_code() -> None:
    base = b'"""Doc."""\ndef f(x):\n    """Says what."""\n    return x + 1  # why\n'
    reworded = b'"""Other words."""\n\ndef f(x):\n    # a new comment\n    return x + 1\n'
    changed = b'"""Doc."""\ndef f(x):\n    """Says what."""\n    return x + 2\n'
    assert pipeline.normalised_code(base) == pipeline.normalised_code(reworded)
    assert pipeline.normalised_code(base) != pipeline.normalised_code(changed)


LOCK_SCRIPT = """
import json, sys, time
from pathlib import Path
from tandem.cloud.build import pipeline
from tests.model_build.test_pipeline import ToyBuilder

zoo, log, me, other = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
toy = ToyBuilder()

def slow_builder(ctx):
    started = time.time()
    time.sleep(2.0)
    entry = toy(ctx)
    with open(log, "a") as fh:
        fh.write(json.dumps([started, time.time()]) + "\\n")
    return entry

pipeline.load_builder = lambda name: slow_builder
me.touch()  # a barrier: both processes enter build_zoo together, after their imports
deadline = time.time() + 60
while not other.exists() and time.time() < deadline:
    time.sleep(0.01)
report = pipeline.build_zoo(zoo, models=("digits",))
print(json.dumps(report["run"]))
"""


def test_concurrent_builds_of_one_zoo_take_turns(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    zoo, log = tmp_path / "zoo", tmp_path / "builds.log"
    ready = [tmp_path / "ready-0", tmp_path / "ready-1"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", LOCK_SCRIPT, str(zoo), str(log), str(me), str(other)],
            cwd=root,
            stdout=subprocess.PIPE,
            text=True,
        )
        for me, other in (ready, ready[::-1])
    ]
    runs = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    # Exactly one process built; the other waited on the lock, then found the cache.
    assert len(log.read_text().splitlines()) == 1
    builder = next(r for r in runs if r["built"] == ["digits"])
    waiter = next(r for r in runs if r["cached"] == ["digits"])
    assert builder["lock_wait_seconds"] < 1.0
    assert waiter["lock_wait_seconds"] > 1.0  # it really ran into the held lock
