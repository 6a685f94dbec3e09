"""The wire contracts: generated code is current, and V2 matches the spec's field numbers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    from tandem.protos.generate import generate, proto_files

    generate(tmp_path)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated, "protoc generated nothing"
    assert len(generated) == 3 * len(proto_files())
    for rel in generated:
        committed = ROOT / "protos" / rel
        assert committed.exists(), f"{rel} is generated but not committed"
        assert committed.read_bytes() == (tmp_path / rel).read_bytes(), (
            f"{rel} is stale: run `make protos` and commit"
        )


def _fields(message: object) -> dict[str, int]:
    return {f.name: f.number for f in message.DESCRIPTOR.fields}  # type: ignore[attr-defined]


def test_v2_service_and_field_numbers_match_the_spec() -> None:
    from tandem.protos.inference import grpc_predict_v2_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert [m.name for m in service.methods] == [
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelStreamInfer",  # Triton's streaming extension (generation)
    ]
    stream = service.methods_by_name["ModelStreamInfer"]
    assert (stream.client_streaming, stream.server_streaming) == (True, True)
    assert _fields(pb.ModelStreamInferResponse) == {"error_message": 1, "infer_response": 2}
    assert _fields(pb.ModelInferRequest) == {
        "model_name": 1,
        "model_version": 2,
        "id": 3,
        "parameters": 4,
        "inputs": 5,
        "outputs": 6,
        "raw_input_contents": 7,
    }
    assert _fields(pb.ModelInferRequest.InferInputTensor) == {
        "name": 1,
        "datatype": 2,
        "shape": 3,
        "parameters": 4,
        "contents": 5,
    }
    assert _fields(pb.ModelInferResponse) == {
        "model_name": 1,
        "model_version": 2,
        "id": 3,
        "parameters": 4,
        "outputs": 5,
        "raw_output_contents": 6,
    }
    assert _fields(pb.InferTensorContents) == {
        "bool_contents": 1,
        "int_contents": 2,
        "int64_contents": 3,
        "uint_contents": 4,
        "uint64_contents": 5,
        "fp32_contents": 6,
        "fp64_contents": 7,
        "bytes_contents": 8,
    }
    assert _fields(pb.ModelMetadataResponse) == {
        "name": 1,
        "versions": 2,
        "platform": 3,
        "inputs": 4,
        "outputs": 5,
    }


def test_device_install_needs_no_grpc_tools() -> None:
    """The generated modules import with grpcio + protobuf alone."""
    import subprocess

    code = (
        "import sys; sys.modules['grpc_tools'] = None\n"
        "import tandem.protos.inference.grpc_predict_v2_pb2_grpc\n"
        "import tandem.protos.fleet.v1.fleet_pb2\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_fleet_topics_roundtrip() -> None:
    from tandem.protos.fleet.v1 import topics

    topic = topics.device_topic("cam-01", topics.REPORTS)
    assert topic == "tandem/v1/devices/cam-01/reports"
    assert topics.parse_device_topic(topic) == ("cam-01", "reports")
    assert topics.parse_device_topic("tandem/v1/devices/../x") is None
    assert topics.parse_device_topic("other/cam-01/reports") is None
    with pytest.raises(ValueError):
        topics.device_topic("a/b", topics.REPORTS)
    assert topics.shared(topics.all_devices("telemetry")).startswith("$share/")
