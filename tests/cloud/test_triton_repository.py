"""A Triton model repository served as it is: config.pbtxt parsed against Triton's schema,
mapped onto the server's config, and one real `tandem serve` called by `tritonclient`."""

from __future__ import annotations

import json
import logging
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tandem.cloud.server.config import ModelConfig
from tandem.cloud.server.errors import RepositoryError
from tandem.cloud.server.triton import load_triton_config, parse_config, to_model_config
from tests.cloud.conftest import ServerFactory, http_post
from tests.cloud.modelkit import digits_onnx, digits_torchscript, tiny_digits_reference
from tests.cloud.test_tritonclient import triton_python  # noqa: F401 - the shared fixture

DIGITS = """
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "pixels" data_type: TYPE_FP32 dims: [ 64 ] } ]
output [ { name: "logits" data_type: TYPE_FP32 dims: [ 10 ] } ]
"""


def mapped(text: str, folder: Path, gpu: bool = False) -> ModelConfig:
    folder.mkdir(parents=True, exist_ok=True)
    return to_model_config(parse_config(text, "config.pbtxt"), folder, lambda _: gpu)


def refused(text: str, folder: Path) -> str:
    with pytest.raises(RepositoryError) as info:
        mapped(text, folder)
    return str(info.value)


# --- mapping ------------------------------------------------------------------------------
def test_every_mapped_field(tmp_path: Path) -> None:
    text = (
        DIGITS
        + """
    name: "digits"
    dynamic_batching {
      preferred_batch_size: [ 4, 8 ]
      max_queue_delay_microseconds: 500
      default_queue_policy { max_queue_size: 16 }
    }
    version_policy: { latest: { num_versions: 2 } }
    instance_group [ { count: 3 kind: KIND_CPU } ]
    parameters { key: "threads" value: { string_value: "1" } }
    """
    )
    config = mapped(text, tmp_path / "digits")
    assert config.name == "digits" and config.backend == "onnxruntime"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 8
    (pixels,) = config.inputs
    assert (pixels.name, pixels.datatype, pixels.dims) == ("pixels", "FP32", (64,))
    assert config.full_shape(pixels) == (-1, 64)  # implicit batch
    assert config.outputs[0].dims == (10,)
    db = config.dynamic_batching
    assert (db.max_queue_delay_us, db.preferred_batch_sizes, db.max_queue_size) == (
        500,
        (4, 8),
        16,
    )
    assert (config.instance_kind, config.instance_count) == ("cpu", 3)
    assert config.version_policy.select([1, 2, 3]) == (2, 3)
    assert config.parameters == {"threads": "1"}


def test_defaults_follow_triton(tmp_path: Path) -> None:
    config = mapped(DIGITS, tmp_path / "digits")
    assert config.dynamic_batching is None
    assert config.version_policy.select([1, 2, 3]) == (3,)
    assert (config.instance_kind, config.instance_count) == ("auto", 1)
    no_batch = DIGITS.replace("max_batch_size: 8", "max_batch_size: 0").replace(
        "[ 64 ]", "[ -1, 64 ]"
    )
    config = mapped(no_batch, tmp_path / "nobatch")
    assert config.full_shape(config.inputs[0]) == (-1, 64)
    latest_empty = DIGITS + "version_policy: { latest: {} }"
    assert mapped(latest_empty, tmp_path / "l").version_policy.select([1, 2]) == (2,)


@pytest.mark.parametrize(
    ("policy", "selected"),
    [("all: {}", (1, 2, 3)), ("specific: { versions: [ 1, 3 ] }", (1, 3))],
)
def test_version_policies(tmp_path: Path, policy: str, selected: tuple[int, ...]) -> None:
    config = mapped(DIGITS + f"version_policy: {{ {policy} }}", tmp_path / "m")
    assert config.version_policy.select([1, 2, 3]) == selected


@pytest.mark.parametrize(
    ("triton", "v2"), [("TYPE_INT64", "INT64"), ("TYPE_BOOL", "BOOL"), ("TYPE_FP16", "FP16")]
)
def test_datatypes(tmp_path: Path, triton: str, v2: str) -> None:
    config = mapped(DIGITS.replace("TYPE_FP32", triton, 1), tmp_path / "m")
    assert config.inputs[0].datatype == v2


@pytest.mark.parametrize("triton", ["TYPE_STRING", "TYPE_BF16"])
def test_unsupported_datatypes_are_refused(tmp_path: Path, triton: str) -> None:
    message = refused(DIGITS.replace("TYPE_FP32", triton, 1), tmp_path / "m")
    assert "'m'" in message and f"input[0].data_type {triton}" in message


@pytest.mark.parametrize(
    ("line", "backend"),
    [
        ('platform: "pytorch_libtorch"', "pytorch"),
        ('backend: "pytorch"', "pytorch"),
        ('backend: "onnxruntime"', "onnxruntime"),
        ('backend: "openvino"', "openvino"),
    ],
)
def test_platforms_and_backends(tmp_path: Path, line: str, backend: str) -> None:
    text = DIGITS.replace('platform: "onnxruntime_onnx"', line)
    assert mapped(text, tmp_path / "m").backend == backend


def test_backend_from_the_model_file_when_config_names_none(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    (folder / "1").mkdir(parents=True)
    (folder / "1" / "model.pt").write_bytes(b"")
    text = DIGITS.replace('platform: "onnxruntime_onnx"', "")
    assert mapped(text, folder).backend == "pytorch"
    (folder / "2").mkdir()
    (folder / "2" / "model.onnx").write_bytes(b"")
    assert "several kinds of model file" in refused(text, folder)


def test_instance_group_gpu_and_its_fallback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = DIGITS + "instance_group [ { count: 2 kind: KIND_GPU } ]"
    assert mapped(text, tmp_path / "m", gpu=True).instance_kind == "gpu"
    with caplog.at_level(logging.WARNING, "tandem.cloud.server.triton"):
        config = mapped(text, tmp_path / "m", gpu=False)
    assert (config.instance_kind, config.instance_count) == ("cpu", 2)
    assert "KIND_GPU but no GPU" in caplog.text


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("sequence_batching {}", "field 'sequence_batching' is not supported"),
        ('ensemble_scheduling { step [ { model_name: "a" } ] }', "'ensemble_scheduling'"),
        ('model_warmup [ { name: "w" batch_size: 1 } ]', "'model_warmup'"),
        ("optimization { graph { level: 1 } }", "'optimization'"),
        ("dynamic_batching { priority_levels: 2 }", "'dynamic_batching.priority_levels'"),
        (
            "dynamic_batching { default_queue_policy { default_timeout_microseconds: 5 } }",
            "'dynamic_batching.default_queue_policy.default_timeout_microseconds'",
        ),
        ("instance_group [ { kind: KIND_MODEL } ]", "kind KIND_MODEL is not supported"),
        (
            "instance_group [ { kind: KIND_CPU }, { kind: KIND_GPU } ]",
            "instance_group mixes kinds",
        ),
        ("instance_group [ { kind: KIND_GPU gpus: [ 1 ] } ]", "instance_group gpus [1]"),
        ("instance_group [ { passive: true } ]", "'instance_group[0].passive'"),
        ('name: "other"', "names it 'other', its folder is 'm'"),
        ('default_model_filename: "net.onnx"', "default_model_filename 'net.onnx'"),
    ],
)
def test_unsupported_fields_are_refused_naming_model_and_field(
    tmp_path: Path, extra: str, expected: str
) -> None:
    message = refused(DIGITS + extra, tmp_path / "m")
    assert message.startswith("model 'm': ") and expected in message


def test_refusals_inside_tensors_and_of_platforms(tmp_path: Path) -> None:
    reshaped = DIGITS.replace("dims: [ 64 ] }", "dims: [ 64 ] reshape { shape: [ 8, 8 ] } }")
    assert "'input[0].reshape'" in refused(reshaped, tmp_path / "m")
    for line, name in [
        ('platform: "ensemble"', "platform 'ensemble'"),
        ('backend: "python"', "backend 'python'"),
    ]:
        text = DIGITS.replace('platform: "onnxruntime_onnx"', line)
        assert name in refused(text, tmp_path / "m")
    disagree = DIGITS + 'backend: "pytorch"'
    assert "disagree" in refused(disagree, tmp_path / "m")


def test_a_field_not_in_tritons_schema_fails_the_parse_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "m" / "config.pbtxt"
    path.parent.mkdir()
    path.write_text(DIGITS + "max_batch: 4\n")
    with pytest.raises(
        RepositoryError, match=r"config\.pbtxt: not a valid Triton model config.*max_batch"
    ):
        load_triton_config(path)


def test_onnx_tensors_come_from_the_model_when_the_config_lists_none(tmp_path: Path) -> None:
    folder = tmp_path / "auto"
    digits_onnx(folder / "1" / "model.onnx")
    config = mapped('platform: "onnxruntime_onnx"\nmax_batch_size: 4', folder)
    assert [(t.name, t.datatype, t.dims) for t in config.inputs] == [("pixels", "FP32", (64,))]
    assert [(t.name, t.dims) for t in config.outputs] == [("logits", (10,))]
    config = mapped('platform: "onnxruntime_onnx"', tmp_path / "auto")
    assert config.inputs[0].dims == (-1, 64)  # no batching: all dims
    torch_folder = tmp_path / "pt"
    (torch_folder / "1").mkdir(parents=True)
    (torch_folder / "1" / "model.pt").write_bytes(b"")
    message = refused('backend: "pytorch"\nmax_batch_size: 4', torch_folder)
    assert "must list its input and output tensors" in message


# --- served end to end --------------------------------------------------------------------
CLIENT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    url, pixels_path = sys.argv[1], sys.argv[2]
    x = np.load(pixels_path)
    client = grpcclient.InferenceServerClient(url=url)
    out = {"ready": {}, "model": {}, "answers": {}}
    for name, version in [("digits", "1"), ("digits", "2"), ("digits_pt", ""), ("broken", "")]:
        try:
            out["ready"][f"{name}/{version}"] = client.is_model_ready(name, version)
        except InferenceServerException as exc:  # an unserved version is NOT_FOUND here
            out["ready"][f"{name}/{version}"] = exc.status()
    for name, inp, outp in [
        ("digits", "pixels", "logits"),
        ("digits_pt", "INPUT__0", "OUTPUT__0"),
        ("digits_auto", "pixels", "logits"),
    ]:
        out["model"][name] = client.get_model_metadata(name, as_json=True)
        tensor = grpcclient.InferInput(inp, list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer(name, [tensor], outputs=[grpcclient.InferRequestedOutput(outp)])
        out["answers"][name] = result.as_numpy(outp).tolist()
    print(json.dumps(out))
    """
)


def write_triton_repository(root: Path) -> Path:
    digits = root / "digits"
    digits_onnx(digits / "1" / "model.onnx")
    digits_onnx(digits / "2" / "model.onnx", bias_shift=5.0)
    (digits / "config.pbtxt").write_text(
        DIGITS
        + """
        dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 1000 }
        version_policy: { latest: { num_versions: 1 } }
        instance_group [ { count: 1 kind: KIND_CPU } ]
        parameters { key: "threads" value: { string_value: "1" } }
        """
    )
    pt = root / "digits_pt"
    digits_torchscript(pt / "1" / "model.pt")
    (pt / "config.pbtxt").write_text(
        'backend: "pytorch"\nmax_batch_size: 8\n'
        'input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 64 ] } ]\n'
        'output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 10 ] } ]\n'
        "instance_group [ { kind: KIND_CPU } ]\n"
    )
    auto = root / "digits_auto"
    digits_onnx(auto / "1" / "model.onnx")
    (auto / "config.pbtxt").write_text('platform: "onnxruntime_onnx"\nmax_batch_size: 8\n')
    broken = root / "broken"
    digits_onnx(broken / "1" / "model.onnx")
    (broken / "config.pbtxt").write_text(DIGITS + "sequence_batching {}\n")
    return root


def test_tritonclient_calls_a_triton_repository_served_as_it_is(
    server_factory: ServerFactory,
    triton_python: Path,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    server = server_factory(write_triton_repository(tmp_path / "triton-repo"))
    x = np.random.default_rng(11).integers(0, 17, size=(3, 64)).astype(np.float32)
    np.save(tmp_path / "pixels.npy", x)
    (tmp_path / "client.py").write_text(CLIENT)
    run = subprocess.run(
        [
            str(triton_python),
            str(tmp_path / "client.py"),
            server.grpc_address,
            str(tmp_path / "pixels.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr + server.log()
    out = json.loads(run.stdout)
    # latest 1 of versions 1 and 2: only 2 is served.
    assert out["ready"] == {
        "digits/1": "StatusCode.NOT_FOUND",
        "digits/2": True,
        "digits_pt/": True,
        "broken/": "StatusCode.NOT_FOUND",
    }
    assert out["model"]["digits"]["versions"] == ["2"]
    assert out["model"]["digits"]["platform"] == "onnxruntime_onnx"
    assert out["model"]["digits"]["inputs"] == [
        {"name": "pixels", "datatype": "FP32", "shape": ["-1", "64"]}
    ]
    assert out["model"]["digits_pt"]["platform"] == "pytorch_libtorch"
    assert out["model"]["digits_pt"]["outputs"] == [
        {"name": "OUTPUT__0", "datatype": "FP32", "shape": ["-1", "10"]}
    ]
    assert out["model"]["digits_auto"]["inputs"] == out["model"]["digits"]["inputs"]
    reference = tiny_digits_reference(x)
    np.testing.assert_allclose(out["answers"]["digits"], reference + 5.0, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["answers"]["digits_pt"], reference, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["answers"]["digits_auto"], reference, rtol=1e-4, atol=1e-4)
    # The broken model is reported, with the field, and did not stop the others.
    status, body = http_post(f"{server.http_url}/v2/repository/index")
    rows = {row["name"]: row for row in json.loads(body)}
    assert status == 200 and rows["broken"]["state"] == "UNAVAILABLE"
    assert "'sequence_batching' is not supported" in rows["broken"]["reason"]
