"""Model versions: policy, a new version picked up by polling or an explicit load call while
requests are in flight (none fails), and a model-repository index."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from tandem.protos.inference import grpc_predict_v2_pb2 as pb
from tests.cloud.conftest import ServerFactory, ServerProcess, http_post, infer_request
from tests.cloud.modelkit import digits_config, digits_onnx, tiny_digits_reference, write_config
from tests.support.processes import wait_until

X = np.arange(2 * 64, dtype=np.float32).reshape(2, 64) % 17


def make_repo(root: Path, versions: dict[int, float], **config: Any) -> Path:
    write_config(root / "digits", digits_config("digits", **config))
    for version, shift in versions.items():
        digits_onnx(root / "digits" / str(version) / "model.onnx", bias_shift=shift)
    return root


def answer(server: ServerProcess, version: str = "") -> tuple[str, np.ndarray[Any, Any]]:
    response = server.stub().ModelInfer(infer_request("digits", X, version=version))
    logits = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(2, 10)
    return response.model_version, logits


class Hammer:
    """Sends requests back to back from a few threads; records every outcome."""

    def __init__(self, server: ServerProcess, threads: int = 4) -> None:
        self.stub = server.stub()
        self.stop = threading.Event()
        self.versions: list[str] = []
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                response = self.stub.ModelInfer(infer_request("digits", X), timeout=10)
                self.versions.append(response.model_version)
            except grpc.RpcError as exc:
                self.errors.append(f"{exc.code().name}: {exc.details()}")

    def __enter__(self) -> Hammer:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)


def test_polling_picks_up_a_new_version_without_failing_requests(
    tmp_path: Path, server_factory: ServerFactory
) -> None:
    repo = make_repo(tmp_path / "repo", {1: 0.0})
    server = server_factory(repo, "--poll-interval", "0.2")
    assert answer(server)[0] == "1"
    with Hammer(server) as hammer:
        time.sleep(0.3)
        digits_onnx(repo / "digits" / "2" / "model.onnx.tmp", bias_shift=100.0)
        (repo / "digits" / "2" / "model.onnx.tmp").rename(repo / "digits" / "2" / "model.onnx")
        wait_until(lambda: answer(server)[0] == "2", timeout=20, message="version 2 served")
        time.sleep(0.3)
    assert hammer.errors == []
    assert "1" in hammer.versions and "2" in hammer.versions
    version, logits = answer(server)
    assert version == "2"
    np.testing.assert_allclose(logits, tiny_digits_reference(X) + 100.0, rtol=1e-4, atol=1e-3)
    # latest 1: version 1 is retired once 2 is in.
    with pytest.raises(grpc.RpcError) as err:
        answer(server, "1")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_explicit_load_call_and_specific_version_policy(
    tmp_path: Path, server_factory: ServerFactory
) -> None:
    repo = make_repo(tmp_path / "repo", {1: 0.0, 2: 10.0})
    server = server_factory(repo)  # no polling
    assert answer(server)[0] == "2"
    digits_onnx(repo / "digits" / "3" / "model.onnx", bias_shift=30.0)
    time.sleep(0.2)
    assert answer(server)[0] == "2"  # not picked up by itself
    with Hammer(server) as hammer:
        status, body = http_post(f"{server.http_url}/v2/repository/models/digits/load")
        assert status == 200, body
        assert json.loads(body)["versions"] == ["3"]
        time.sleep(0.2)
    assert hammer.errors == []
    assert answer(server)[0] == "3"
    # Now serve exactly versions 1 and 3.
    write_config(
        repo / "digits", digits_config("digits", version_policy={"specific": {"versions": [1, 3]}})
    )
    status, body = http_post(f"{server.http_url}/v2/repository/models/digits/load")
    assert status == 200 and json.loads(body)["versions"] == ["1", "3"]
    np.testing.assert_allclose(
        answer(server, "1")[1], tiny_digits_reference(X), rtol=1e-4, atol=1e-3
    )
    np.testing.assert_allclose(
        answer(server, "3")[1], tiny_digits_reference(X) + 30.0, rtol=1e-4, atol=1e-3
    )
    with pytest.raises(grpc.RpcError) as err:
        answer(server, "2")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    meta = server.stub().ModelMetadata(pb.ModelMetadataRequest(name="digits"))
    assert list(meta.versions) == ["1", "3"]
    status, body = http_post(f"{server.http_url}/v2/repository/index")
    assert status == 200
    assert {(r["name"], r["version"], r["state"]) for r in json.loads(body)} == {
        ("digits", "1", "READY"),
        ("digits", "3", "READY"),
    }
    status, _ = http_post(f"{server.http_url}/v2/repository/models/nope/load")
    assert status == 404


def test_a_broken_model_does_not_stop_the_others(
    tmp_path: Path, server_factory: ServerFactory
) -> None:
    repo = make_repo(tmp_path / "repo", {1: 0.0})
    write_config(repo / "broken", digits_config("broken", backend="tensorrt"))
    write_config(repo / "empty", digits_config("empty"))  # no version folder at all
    server = server_factory(repo)
    assert answer(server)[0] == "1"
    status, body = http_post(f"{server.http_url}/v2/repository/index")
    assert status == 200
    rows = {r["name"]: r for r in json.loads(body)}
    assert rows["digits"]["state"] == "READY"
    assert rows["broken"]["state"] == "UNAVAILABLE" and "backend" in rows["broken"]["reason"]
    assert rows["empty"]["state"] == "UNAVAILABLE" and "version" in rows["empty"]["reason"]
    with pytest.raises(grpc.RpcError) as err:
        server.stub().ModelReady(pb.ModelReadyRequest(name="broken"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
