"""Pure pieces of the inference server, without a process: config validation, version
policy, tensor header checks and decoding."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tandem.cloud.server.config import ModelConfig, ServerConfig, VersionPolicy
from tandem.cloud.server.errors import InvalidInputError
from tandem.cloud.server.tensors import TensorHeader, check_headers, from_raw, from_values
from tandem.errors import ConfigError
from tests.cloud.modelkit import digits_config


def config(**changes: Any) -> ModelConfig:
    return ModelConfig.from_dict(digits_config("digits", **changes))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"backend": "tensorrt"}, "backend"),
        ({"max_batch_size": -1}, "max_batch_size"),
        ({"instance_group": {"count": 0}}, "instance_group.count"),
        ({"instance_group": {"kind": "tpu"}}, "instance_group.kind"),
        (
            {"dynamic_batching": {"preferred_batch_sizes": [128]}},
            "dynamic_batching.preferred_batch_sizes",
        ),
        ({"dynamic_batching": {"max_queue_size": 0}}, "dynamic_batching.max_queue_size"),
        ({"max_batch_size": 0}, "dynamic_batching"),
        ({"input": [{"name": "pixels", "datatype": "STRING", "dims": [64]}]}, "pixels.datatype"),
        ({"input": [{"name": "pixels", "datatype": "FP32", "dims": [0]}]}, "pixels.dims"),
        ({"version_policy": {"latest": {"num_versions": 0}}}, "version_policy.latest"),
        ({"output": []}, "output"),
    ],
)
def test_model_config_names_the_wrong_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        config(**changes)
    assert err.value.field.startswith(field), err.value


def test_server_config_checks_its_fields(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="grpc-port"):
        ServerConfig(repository=tmp_path, grpc_port=70000)
    with pytest.raises(ConfigError, match="tls"):
        ServerConfig(repository=tmp_path, tls_cert=tmp_path / "c.pem")
    with pytest.raises(ConfigError, match="tls-client-ca"):
        ServerConfig(repository=tmp_path, tls_client_ca=tmp_path / "ca.pem")


def test_version_policy() -> None:
    assert VersionPolicy(latest=2).select([3, 1, 7, 5]) == (5, 7)
    assert VersionPolicy(latest=None, specific=(1, 5, 9)).select([1, 3, 5]) == (1, 5)
    with pytest.raises(ConfigError):
        VersionPolicy(latest=1, specific=(1,))


def test_check_headers() -> None:
    cfg = config()
    assert check_headers(cfg, [TensorHeader("pixels", "FP32", (7, 64))], 1 << 20) == 7
    for header, fragment in [
        (TensorHeader("pixel", "FP32", (1, 64)), "unknown input 'pixel'"),
        (TensorHeader("pixels", "INT64", (1, 64)), "datatype INT64"),
        (TensorHeader("pixels", "FP32", (1, 63)), "does not match"),
        (TensorHeader("pixels", "FP32", (0, 64)), "batch size 0"),
        (TensorHeader("pixels", "FP32", (-1, 64)), "negative"),
        (TensorHeader("pixels", "FP32", (1 << 62, 1 << 62)), "more elements"),
    ]:
        with pytest.raises(InvalidInputError, match=fragment) as err:
            check_headers(cfg, [header], 1 << 20)
        assert err.value.tensor == header.name
    with pytest.raises(InvalidInputError, match="missing input 'pixels'"):
        check_headers(cfg, [], 1 << 20)


def test_decoding() -> None:
    header = TensorHeader("pixels", "FP32", (2, 3))
    data = np.arange(6, dtype="<f4")
    np.testing.assert_array_equal(from_raw(header, data.tobytes()), data.reshape(2, 3))
    np.testing.assert_array_equal(from_values(header, [[0, 1, 2], [3, 4, 5]]), data.reshape(2, 3))
    with pytest.raises(InvalidInputError, match="needs 24"):
        from_raw(header, data.tobytes()[:-1])
    with pytest.raises(InvalidInputError, match="needs 6"):
        from_values(header, [1.0, 2.0])
    with pytest.raises(InvalidInputError, match="not INT64"):
        from_values(TensorHeader("ids", "INT64", (1,)), ["x"])
