"""Tiny real models in the artifact format, for SDK tests that must not wait for the zoo.

Builds a small digits classifier (sklearn's 8x8 digits, 64 raw pixel values 0..16 in, 10
logits out, normalisation inside the model) and writes it the way the build pipeline does:
`artifacts/digits/<version>/<variant>/` signed variants with zstd payloads, reference and
validation .npz, plus a cloud `repository/digits/` holding a bigger teacher. Everything is
cached under build/sdk-models keyed by this file's hash, so a second run is instant.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from tests.support.variants import pack

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "build" / "sdk-models"
VARIANTS = ("onnx-int8", "openvino-fp32", "tflite-fp32", "torch-fp32")


def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = data.data.astype(np.float32)
    y = data.target.astype(np.int64)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    split = int(len(x) * 0.7)
    return x[:split], y[:split], x[split:], y[split:]


def _train(hidden: int, epochs: int, seed: int) -> Any:
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.body(pixels / 16.0)

    # One thread, as the build pipeline trains: a tiny MLP gains nothing from two, and on a
    # shared 2-core machine the thread pool's contention made this 6x slower (42 s vs 7 s).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        x_train, y_train, _, _ = _digits()
        net = Net()
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
        for _ in range(epochs):
            for i in range(0, len(xt), 128):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(net(xt[i : i + 128]), yt[i : i + 128])
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(previous)
    net.eval()
    return net


def _export_onnx(net: Any, path: Path) -> None:
    import torch

    torch.onnx.export(
        net,
        (torch.zeros(1, 64),),
        str(path),
        input_names=["pixels"],
        output_names=["logits"],
        dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )


def _fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    best_t, best_nll = 1.0, float("inf")
    for t in np.linspace(0.3, 5.0, 95):
        z = logits / t
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        nll = float(-logp[np.arange(len(labels)), labels].mean())
        if nll < best_nll:
            best_t, best_nll = float(t), nll
    return best_t


def _write_variant(
    folder: Path,
    *,
    version: int,
    variant: str,
    runtime: str,
    payload: dict[str, Path],
    entrypoint: str,
    reference: dict[str, np.ndarray],
    validation: dict[str, np.ndarray] | None,
    temperature: float,
    signing_key: Any,
    model: str = "digits",
    task: str = "classification",
    inputs: tuple[Any, ...] | None = None,
    outputs: tuple[Any, ...] | None = None,
) -> None:
    import io

    from tandem.sdk.artifacts import (
        Manifest,
        SignatureEntry,
        TensorSpec,
        key_id,
        signatures_to_bytes,
    )

    folder.mkdir(parents=True, exist_ok=True)
    blobs: dict[str, bytes] = {name: path.read_bytes() for name, path in payload.items()}
    for name, arrays in (("reference.npz", reference), ("validation.npz", validation)):
        if arrays is None:
            continue
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        blobs[name] = buf.getvalue()
    entries = []
    for name, raw in blobs.items():
        entry, stored = pack(name, raw)
        (folder / entry.stored_as).write_bytes(stored)
        entries.append(entry)
    now = datetime.now(UTC).replace(microsecond=0)
    manifest = Manifest(
        model=model,
        version=version,
        variant=variant,
        runtime=runtime,
        hardware="any",
        precision="int8" if "int8" in variant else "fp32",
        task=task,
        created=now,
        expires=now + timedelta(days=365),
        entrypoint=entrypoint,
        files=tuple(entries),
        inputs=inputs or (TensorSpec("pixels", "FP32", (-1, 64)),),
        outputs=outputs or (TensorSpec("logits", "FP32", (-1, 10)),),
        calibration={"method": "temperature", "temperature": temperature}
        if task == "classification"
        else None,
        reference="reference.npz",
        validation="validation.npz" if validation is not None else None,
        metrics={},
    )
    from cryptography.hazmat.primitives import serialization

    signed = manifest.to_bytes()
    raw_pub = signing_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    (folder / "manifest.json").write_bytes(signed)
    (folder / "manifest.sig.json").write_bytes(
        signatures_to_bytes([SignatureEntry(key_id(raw_pub), signing_key.sign(signed))])
    )


def _build(out: Path, versions: tuple[int, ...]) -> None:
    import torch
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    _, _, x_held, y_held = _digits()
    # Held-out rows split in two: the validation set shipped in the artifact (calibration and
    # the cascade threshold) and the test set the benchmarks score on; they never overlap.
    half = len(x_held) // 2
    x_val, y_val, x_test, y_test = x_held[:half], y_held[:half], x_held[half:], y_held[half:]
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)

    teacher = _train(hidden=256, epochs=60, seed=7)
    repo = out / "repository" / "digits"
    (repo / "1").mkdir(parents=True, exist_ok=True)
    _export_onnx(teacher, repo / "1" / "model.onnx")
    (repo / "config.json").write_text(
        json.dumps(
            {
                "name": "digits",
                "backend": "onnxruntime",
                "max_batch_size": 64,
                "input": [{"name": "pixels", "datatype": "FP32", "dims": [64]}],
                "output": [{"name": "logits", "datatype": "FP32", "dims": [10]}],
            }
        )
    )

    for version in versions:
        # Each version is a differently seeded (and sized) student, so tests can tell them apart.
        net = _train(hidden=16 + 8 * version, epochs=12, seed=version)
        vdir = work / f"v{version}"
        vdir.mkdir(exist_ok=True)
        fp32 = vdir / "model-fp32.onnx"
        _export_onnx(net, fp32)
        from onnxruntime.quantization import QuantType, quantize_dynamic

        int8 = vdir / "model.onnx"
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
        with torch.no_grad():
            val_logits = net(torch.from_numpy(x_val)).numpy()
        temperature = _fit_temperature(val_logits, y_val)
        ref_x = x_val[:16]

        from tandem.sdk.runtimes.openvino import import_openvino

        ov = import_openvino()
        ov_model = ov.convert_model(str(fp32))
        ov.save_model(ov_model, str(vdir / "model.xml"), compress_to_fp16=False)

        scripted = torch.jit.trace(net, torch.zeros(1, 64))
        scripted.save(str(vdir / "model.pt"))

        import litert_torch

        edge = litert_torch.convert(net, (torch.zeros(1, 64),))
        edge.export(str(vdir / "model.tflite"))

        import onnxruntime as ort

        sess = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
        int8_ref = sess.run(None, {"pixels": ref_x})[0]
        with torch.no_grad():
            fp32_ref = net(torch.from_numpy(ref_x)).numpy()
        validation = {"input.pixels": x_val, "labels": y_val}
        specs = {
            "onnx-int8": ("onnx", {"model.onnx": int8}, "model.onnx", int8_ref),
            "openvino-fp32": (
                "openvino",
                {"model.xml": vdir / "model.xml", "model.bin": vdir / "model.bin"},
                "model.xml",
                fp32_ref,
            ),
            "tflite-fp32": (
                "tflite",
                {"model.tflite": vdir / "model.tflite"},
                "model.tflite",
                fp32_ref,
            ),
            "torch-fp32": ("torch", {"model.pt": vdir / "model.pt"}, "model.pt", fp32_ref),
        }
        for variant, (runtime, payload, entry, ref_out) in specs.items():
            _write_variant(
                out / "artifacts" / "digits" / str(version) / variant,
                version=version,
                variant=variant,
                runtime=runtime,
                payload=payload,
                entrypoint=entry,
                reference={"input.pixels": ref_x, "output.logits": ref_out},
                validation=validation,
                temperature=temperature,
                signing_key=key,
            )
    np.savez(out / "test_set.npz", x=x_test, y=y_test)
    shutil.rmtree(work)


def build_models(versions: tuple[int, ...] = (1, 2)) -> Path:
    """Returns a folder with artifacts/, repository/ and test_set.npz (cached)."""
    digest = hashlib.sha256(Path(__file__).read_bytes() + repr(versions).encode()).hexdigest()[:12]
    out = CACHE / digest
    if (out / "done").exists():
        return out
    tmp = CACHE / f".{digest}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    _build(tmp, versions)
    (tmp / "done").write_text("ok")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    print(build_models())
