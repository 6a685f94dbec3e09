"""Every runtime against the artifact's reference outputs; selection, persistence, forcing."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from tandem.errors import (
    ConfigError,
    MissingDependencyError,
    NoLocalModelError,
    RuntimeBackendError,
)
from tandem.sdk.artifacts import load_npz, load_variant, split_reference
from tandem.sdk.hardware import HardwareInfo, probe, read_cpu_flags
from tandem.sdk.local import (
    CHOICES_FILE,
    RuntimeSelector,
    SelectionConfig,
    check_against_reference,
    unpack_to_cache,
)
from tandem.sdk.runtimes import Runtime, get_runtime, register_runtime, runtime_names
from tandem.sdk.runtimes.base import _REGISTRY

VARIANTS = {
    "onnx": "onnx-int8",
    "openvino": "openvino-fp32",
    "tflite": "tflite-fp32",
    "torch": "torch-fp32",
}


@pytest.mark.parametrize("runtime", sorted(VARIANTS))
def test_each_runtime_matches_reference_outputs(
    artifacts: Path, tmp_path: Path, runtime: str
) -> None:
    variant = load_variant(artifacts / "digits" / "2" / VARIANTS[runtime])
    unpacked = unpack_to_cache(variant, tmp_path)
    # A build's artifacts folder is never written into: payloads unpack into the cache.
    assert unpacked.is_relative_to(tmp_path)
    assert not (variant.path / variant.manifest.entrypoint).exists()
    cls = get_runtime(runtime)
    with cls.load(variant.manifest, unpacked) as loaded:
        inputs, expected = split_reference(load_npz(unpacked / "reference.npz"))
        got = loaded.run(inputs)
        np.testing.assert_allclose(got["logits"], expected["logits"], rtol=1e-3, atol=1e-3)
        # Batch sizes other than the reference's work (LiteRT resizes its input).
        one = loaded.run({"pixels": inputs["pixels"][:1]})
        assert one["logits"].shape == (1, 10)
        # Dynamically quantized INT8 ranges its activations per batch, so one row is close
        # to, not bit-equal with, the same row inside the reference batch.
        np.testing.assert_allclose(one["logits"][0], expected["logits"][0], rtol=0.01, atol=0.05)
        assert one["logits"][0].argmax() == expected["logits"][0].argmax()
        assert got["logits"].dtype == np.float32


def test_registry_names_and_unknown_runtime() -> None:
    assert {"onnx", "tflite", "openvino", "torch"} <= set(runtime_names())
    with pytest.raises(ConfigError, match="unknown runtime 'nope'"):
        get_runtime("nope")


def test_missing_package_names_the_extra(artifacts: Path, tmp_path: Path) -> None:
    @register_runtime
    class Absent(Runtime):
        name = "absent-test"
        packages: ClassVar[tuple[str, ...]] = ("tandem_no_such_package_xyz",)
        extra = "absent"

        @classmethod
        def load(cls, manifest: Any, model_dir: Path, **options: Any) -> Runtime:
            cls.import_package()
            raise AssertionError("unreachable")

        def run(self, feeds: Any) -> Any:
            raise AssertionError("unreachable")

    try:
        assert not Absent.is_installed()
        with pytest.raises(MissingDependencyError) as info:
            Absent.load(None, tmp_path)
        assert "pip install 'tandem[absent]'" in str(info.value)
        assert info.value.extra == "absent"
        assert isinstance(info.value, ImportError)
    finally:
        _REGISTRY.pop("absent-test", None)


def test_hardware_probe_reads_cpu_flags_and_providers(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor : 0\nflags : fpu sse4_2 avx2 avx512_vnni foo\n")
    assert read_cpu_flags(cpuinfo) == ("sse4_2", "avx2", "avx512_vnni")
    info = probe()
    assert "CPUExecutionProvider" in info.onnx_providers
    assert "CPU" in info.openvino_devices
    assert info.matches("any") and info.matches(info.machine)
    assert not HardwareInfo("x86_64", 1, ()).matches("aarch64")


def _variants(artifacts: Path, version: int = 2) -> list[Any]:
    return [load_variant(p) for p in sorted((artifacts / "digits" / str(version)).iterdir())]


def test_auto_selection_times_every_runtime_and_remembers(artifacts: Path, tmp_path: Path) -> None:
    selector = RuntimeSelector(tmp_path, SelectionConfig(timed_runs=5, warmup_runs=1))
    model, selection = selector.choose(_variants(artifacts))
    timed = {c.runtime: c.median_ms for c in selection.candidates}
    assert set(timed) == {"onnx", "openvino", "tflite", "torch"}
    assert all(v is not None and v > 0 for v in timed.values())
    fastest = min(timed, key=lambda k: timed[k])  # type: ignore[arg-type,return-value]
    assert selection.runtime == model.runtime_name == fastest
    assert selection.hardware["cpu_flags"] == list(read_cpu_flags())
    stored = json.loads((tmp_path / CHOICES_FILE).read_text())["digits/2"]
    assert stored["variant"] == selection.variant

    # A second selector (a restarted app) reuses the remembered choice without timing.
    again, second = RuntimeSelector(tmp_path, SelectionConfig()).choose(_variants(artifacts))
    assert second.from_cache and second.variant == selection.variant
    assert again.runtime_name == model.runtime_name


def test_forced_runtime_and_variant(artifacts: Path, tmp_path: Path) -> None:
    for forced, expected in (("torch", "torch"), ("openvino-fp32", "openvino")):
        model, selection = RuntimeSelector(tmp_path, SelectionConfig(runtime=forced)).choose(
            _variants(artifacts)
        )
        assert model.runtime_name == expected == selection.runtime
    with pytest.raises(NoLocalModelError, match="no variant for runtime 'tflite-int8'"):
        RuntimeSelector(tmp_path, SelectionConfig(runtime="tflite-int8")).choose(
            _variants(artifacts)
        )


def test_outputs_that_disagree_with_the_reference_are_rejected(
    artifacts: Path, tmp_path: Path
) -> None:
    # Zero tolerance: only variants whose reference was produced by that very runtime pass
    # (onnx-int8's reference is onnxruntime's own output); the fp32 ones differ in the last bits
    # or more, so they must be rejected with the reason recorded.
    strict = SelectionConfig(rtol=0.0, atol=0.0, timed_runs=2, warmup_runs=0, remember=False)
    model, selection = RuntimeSelector(tmp_path, strict).choose(_variants(artifacts))
    rejected = {c.variant: c.rejected for c in selection.candidates if c.rejected}
    assert model.variant_name not in rejected
    assert "tflite-fp32" in rejected or "openvino-fp32" in rejected
    assert all("differs from the reference" in r for r in rejected.values())

    # A variant whose reference outputs are plainly wrong is never chosen.
    bad = tmp_path / "bad" / "digits" / "2" / "onnx-int8"
    shutil.copytree(artifacts / "digits" / "2" / "onnx-int8", bad)
    variant = load_variant(bad)
    loaded = RuntimeSelector(tmp_path, SelectionConfig())._load(variant)
    wrong = dict(load_npz(loaded.unpacked / "reference.npz"))
    wrong["output.logits"] = wrong["output.logits"] + 5.0
    np.savez(loaded.unpacked / "reference.npz", **wrong)
    with pytest.raises(Exception, match="differs from the reference"):
        check_against_reference(loaded, SelectionConfig())


@pytest.mark.parametrize(
    ("runtime", "hidden", "extra"),
    [
        ("onnx", ("onnxruntime",), "onnx"),
        ("tflite", ("ai_edge_litert", "tflite_runtime"), "tflite"),
        ("openvino", ("openvino",), "openvino"),
        ("torch", ("torch",), "torch"),
    ],
)
def test_a_missing_runtime_package_names_its_extra(
    artifacts: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    runtime: str,
    hidden: tuple[str, ...],
    extra: str,
) -> None:
    for package in hidden:
        monkeypatch.setitem(sys.modules, package, None)  # `import package` now fails
    cls = get_runtime(runtime)
    assert not cls.is_installed()
    variant = load_variant(artifacts / "digits" / "2" / VARIANTS[runtime])
    with pytest.raises(MissingDependencyError) as info:
        cls.load(variant.manifest, tmp_path)
    assert f"pip install 'tandem[{extra}]'" in str(info.value)
    # Auto-selection skips it, saying why, and picks among the others.
    model, selection = RuntimeSelector(
        tmp_path, SelectionConfig(remember=False, timed_runs=1, warmup_runs=0)
    ).choose(_variants(artifacts))
    reasons = {c.runtime: c.rejected for c in selection.candidates}
    assert f"tandem[{extra}]" in str(reasons[runtime])
    assert model.runtime_name != runtime


@pytest.mark.parametrize("runtime", sorted(VARIANTS))
def test_each_runtime_is_safe_to_call_from_many_threads(
    artifacts: Path, tmp_path: Path, runtime: str, test_set: tuple[np.ndarray, np.ndarray]
) -> None:
    import threading

    from tandem.sdk import Client

    with Client(
        "digits",
        artifacts=artifacts,
        policy="local_only",
        runtime=VARIANTS[runtime],
        cache_dir=tmp_path,
        watch_interval_s=0,
    ) as client:
        x = test_set[0]
        # Different batch sizes at once: LiteRT resizes, OpenVINO keeps one request per thread.
        batches = [x[i : i + 1 + i % 5] for i in range(40)]
        expected = [client.infer(b).output for b in batches]
        failures: list[str] = []

        def work(offset: int) -> None:
            for k in range(len(batches)):
                i = (k + offset) % len(batches)
                got = client.infer(batches[i]).output
                if got.shape != expected[i].shape or not np.allclose(got, expected[i], atol=1e-4):
                    failures.append(f"batch {i}: {got.shape} vs {expected[i].shape}")

        threads = [threading.Thread(target=work, args=(o * 7,)) for o in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not failures, failures[:3]


def test_exported_programs_load_from_many_threads_at_once(tmp_path: Path) -> None:
    """torch.export.load keeps a module-global deserializer: two agents warming up .pt2
    variants in one process made the second load fail (and killed the SDK's watcher)."""
    import threading
    from types import SimpleNamespace

    torch = pytest.importorskip("torch")
    from tandem.sdk.artifacts import TensorSpec
    from tandem.sdk.runtimes.torch import TorchRuntime

    torch.manual_seed(0)
    program = torch.export.export(torch.nn.Linear(4, 2).eval(), (torch.zeros(1, 4),))
    torch.export.save(program, str(tmp_path / "model.pt2"))
    manifest = SimpleNamespace(
        entrypoint="model.pt2",
        inputs=(TensorSpec("x", "FP32", (-1, 4)),),
        outputs=(TensorSpec("y", "FP32", (-1, 2)),),
    )
    start = threading.Barrier(6)
    failures: list[BaseException] = []
    answers: list[np.ndarray] = []

    def load() -> None:
        start.wait()
        try:
            runtime = TorchRuntime.load(manifest, tmp_path)  # type: ignore[arg-type]
            answers.append(next(iter(runtime.run({"x": np.ones((1, 4), np.float32)}).values())))
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            failures.append(exc)

    threads = [threading.Thread(target=load) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, failures[:2]
    assert len(answers) == 6 and all(np.array_equal(a, answers[0]) for a in answers)
    (tmp_path / "model.pt2").write_bytes(b"not a program")
    with pytest.raises(RuntimeBackendError, match=r"torch cannot load model\.pt2"):
        TorchRuntime.load(manifest, tmp_path)  # type: ignore[arg-type]
