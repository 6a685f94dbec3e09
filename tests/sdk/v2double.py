"""A V2 (Open Inference Protocol) gRPC server whose behaviour a test scripts.

A real grpc.server on a loopback port, in the test process: it can fail the next N calls
with a status, delay answers, check a bearer token, and computes its answer with a numpy
function (by default: the logits of a fixed linear map of the pixels), so retries, breakers,
hedging and shadow sampling are tested over a real gRPC connection.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from tandem.protos.inference import grpc_predict_v2_pb2 as pb
from tandem.protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from tandem.sdk.datatypes import DATATYPES
from tests.support.processes import free_port

Compute = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def default_compute(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    pixels = inputs["pixels"].astype(np.float32)
    weights = np.random.default_rng(0).standard_normal((64, 10)).astype(np.float32)
    return {"logits": pixels @ weights / 16.0}


@dataclass
class Script:
    fail_next: list[str] = field(default_factory=list)  # status names for the next calls
    fail_always: str | None = None
    delay_s: float = 0.0
    token: str | None = None
    compute: Compute = default_compute
    model_version: str = "7"


class V2Double(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self) -> None:
        self.script = Script()
        self.calls = 0
        self.infer_calls = 0
        self.metadata_seen: list[dict[str, str]] = []
        self.lock = threading.Lock()

    def _check(self, context: Any) -> None:
        metadata = dict(context.invocation_metadata())
        with self.lock:
            self.calls += 1
            self.metadata_seen.append(metadata)
        token = self.script.token
        if token is not None and metadata.get("authorization") != f"Bearer {token}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad or missing bearer token")

    def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=True)

    def ModelMetadata(self, request: Any, context: Any) -> Any:
        self._check(context)
        response = pb.ModelMetadataResponse(name=request.name, versions=["7"], platform="double")
        response.inputs.add(name="pixels", datatype="FP32", shape=[-1, 64])
        response.outputs.add(name="logits", datatype="FP32", shape=[-1, 10])
        return response

    def ModelInfer(self, request: Any, context: Any) -> Any:
        self._check(context)
        with self.lock:
            self.infer_calls += 1
            code = self.script.fail_next.pop(0) if self.script.fail_next else None
        code = code or self.script.fail_always
        if self.script.delay_s:
            time.sleep(self.script.delay_s)
        if code is not None:
            context.abort(getattr(grpc.StatusCode, code), f"scripted {code}")
        inputs = {}
        for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
            dtype = DATATYPES.get(tensor.datatype)
            if dtype is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"input {tensor.name!r}: datatype")
            inputs[tensor.name] = np.frombuffer(raw, dtype=dtype).reshape(tuple(tensor.shape))
        outputs = self.script.compute(inputs)
        response = pb.ModelInferResponse(
            model_name=request.model_name, model_version=self.script.model_version, id=request.id
        )
        for name, array in outputs.items():
            array = np.ascontiguousarray(array, dtype=np.float32)
            response.outputs.add(name=name, datatype="FP32", shape=array.shape)
            response.raw_output_contents.append(array.tobytes())
        return response


class V2Server:
    def __init__(self, tls: tuple[bytes, bytes] | None = None) -> None:
        """`tls`: (private key PEM, certificate chain PEM) to serve over TLS."""
        self.servicer = V2Double()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, self.server)
        self.port = free_port()
        if tls is None:
            self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        else:
            credentials = grpc.ssl_server_credentials([tls])
            self.server.add_secure_port(f"127.0.0.1:{self.port}", credentials)
        self.server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def script(self) -> Script:
        return self.servicer.script

    def stop(self) -> None:
        self.server.stop(grace=None)


def echo_compute(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Returns the input as the output: a V2 server that does no work (wire cost only)."""
    return {"logits": inputs["pixels"]}


def main() -> None:
    """Runs the double as its own process: `python -m tests.sdk.v2double --port P [--echo]`."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--echo", action="store_true")
    args = parser.parse_args()
    servicer = V2Double()
    if args.echo:
        servicer.script.compute = echo_compute
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    server.wait_for_termination()


if __name__ == "__main__":
    main()


def self_signed(name: str = "tandem-test") -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) for `name` and 127.0.0.1, signed by itself."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)
