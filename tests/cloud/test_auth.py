"""Bearer-token authentication and TLS / mTLS against real server processes."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.protos.inference import grpc_predict_v2_pb2 as pb
from tandem.protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.cloud.conftest import ServerFactory, http_get, infer_request

X = np.ones((1, 64), dtype=np.float32)


def test_token_is_required_for_inference(
    test_repository: Path, server_factory: ServerFactory, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    server = server_factory(test_repository, "--model", "digits", "--token-file", str(token_file))
    stub = server.stub()
    for metadata in ([], [("authorization", "Bearer wrong")], [("authorization", "s3cret-token")]):
        for call in (
            lambda m: stub.ModelInfer(infer_request("digits", X), metadata=m),
            lambda m: stub.ServerLive(pb.ServerLiveRequest(), metadata=m),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call(metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    good = [("authorization", "Bearer s3cret-token")]
    assert stub.ModelInfer(infer_request("digits", X), metadata=good).model_name == "digits"
    # Health stays open for probes.
    channel = grpc.insecure_channel(server.grpc_address)
    server.channels.append(channel)
    assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status == (
        health_pb2.HealthCheckResponse.SERVING
    )
    assert http_get(f"{server.http_url}/v2/health/ready")[0] == 200
    assert http_get(f"{server.http_url}/v2/models/digits")[0] == 401
    assert (
        http_get(f"{server.http_url}/v2/models/digits", {"authorization": "Bearer s3cret-token"})[0]
        == 200
    )


def _cert(
    subject: str,
    issuer_key: ec.EllipticCurvePrivateKey | None = None,
    issuer: x509.Certificate | None = None,
    ca: bool = False,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    return key, cert


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_mutual_tls(test_repository: Path, server_factory: ServerFactory, tmp_path: Path) -> None:
    ca_key, ca = _cert("tandem test CA", ca=True)
    server_key, server_cert = _cert("localhost", ca_key, ca)
    client_key, client_cert = _cert("client-1", ca_key, ca)
    _, stranger_ca = _cert("someone else", ca=True)
    files = {
        "ca.pem": ca.public_bytes(serialization.Encoding.PEM),
        "server.pem": server_cert.public_bytes(serialization.Encoding.PEM),
        "server.key": _pem(server_key),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    server = server_factory(
        test_repository,
        "--model",
        "digits",
        "--http-port",
        "0",
        "--tls-cert",
        str(tmp_path / "server.pem"),
        "--tls-key",
        str(tmp_path / "server.key"),
        "--tls-client-ca",
        str(tmp_path / "ca.pem"),
        wait_ready=False,
    )
    from tests.support.processes import wait_for_port

    wait_for_port(server.grpc_port, proc=server.proc, timeout=60)
    target = f"localhost:{server.grpc_port}"

    def stub(creds: grpc.ChannelCredentials) -> pb_grpc.GRPCInferenceServiceStub:
        channel = grpc.secure_channel(target, creds)
        server.channels.append(channel)
        return pb_grpc.GRPCInferenceServiceStub(channel)

    with_cert = grpc.ssl_channel_credentials(
        root_certificates=files["ca.pem"],
        private_key=_pem(client_key),
        certificate_chain=client_cert.public_bytes(serialization.Encoding.PEM),
    )
    reply = stub(with_cert).ModelInfer(infer_request("digits", X), timeout=30)
    assert reply.model_name == "digits"
    without_cert = grpc.ssl_channel_credentials(root_certificates=files["ca.pem"])
    with pytest.raises(grpc.RpcError) as err:
        stub(without_cert).ServerLive(pb.ServerLiveRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    wrong_ca = grpc.ssl_channel_credentials(
        root_certificates=stranger_ca.public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(grpc.RpcError) as err:
        stub(wrong_ca).ServerLive(pb.ServerLiveRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # Plaintext is refused too.
    with pytest.raises(grpc.RpcError):
        server.stub().ServerLive(pb.ServerLiveRequest(), timeout=10)
