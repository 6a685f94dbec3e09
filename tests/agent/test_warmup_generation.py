"""Warm-up, activation and the health probe of a generative variant (task "generation"),
without a broker: the tiny random Llama (tests/support/tiny_llm.py) built and signed by the
real generative build, then warmed up by `tandem.agent.warmup` and activated by the agent's
own `_activate` / `_check_health` on a store in a temporary folder.

The decoder has `past_key.*`/`past_value.*` inputs, which the plain runtime cannot feed:
before the warm-up knew generative variants, every one of them FAILED here.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

from tandem.agent.agent import Agent
from tandem.agent.config import AgentConfig, BrokerAddress
from tandem.agent.errors import WarmupError
from tandem.agent.warmup import load_runner, warm_up
from tandem.errors import RuntimeBackendError
from tandem.protos.fleet.v1 import fleet_pb2
from tandem.sdk.artifacts import (
    Manifest,
    TrustedKeys,
    load_npz,
    load_variant,
    read_manifest_unverified,
    unpack_variant,
)
from tandem.sdk.generation import LocalGenerator

Kind = fleet_pb2.DeviceReport.Kind
MODEL, VARIANT = "tiny", "onnx-int8"
PROMPT = "w5 w9 w3"


@dataclass(frozen=True)
class Zoo:
    good: Path  # v1 as the build made it, unpacked (as the agent's store holds it)
    wrong: Path  # v2: the same files, signed with reference tokens the model does not make
    public_key: Path
    reference: dict[str, Any]


def _unpacked(folder: Path, trusted: TrustedKeys) -> Path:
    unpack_variant(load_variant(folder, trusted))
    return folder


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    from tandem.cloud.build.context import BuildContext
    from tandem.cloud.build.generative import INPUTS, OUTPUTS, build_generative
    from tandem.cloud.build.packaging import write_variant
    from tandem.cloud.build.signing import Signer, generate_keypair
    from tests.support.tiny_llm import tiny_model, tiny_source

    root = tmp_path_factory.mktemp("gen-agent")
    key, public = generate_keypair(root / "keys")
    signer = Signer.from_file(key)
    work = root / "work"
    work.mkdir()
    ctx = BuildContext(
        out_dir=root,
        model=MODEL,
        signer=signer,
        work_dir=work,
        cache_dir=root / ".cache",
        options={"steps": 8, "timed_prompts": 1, "min_agreement": 0.0},
    )
    build_generative(ctx, tiny_source(tiny_model()), (PROMPT,))
    trusted = TrustedKeys.from_files([public])
    good = _unpacked(root / "artifacts" / MODEL / "1" / VARIANT, trusted)
    reference = load_npz(good / "reference.npz")
    manifest = read_manifest_unverified(good)
    tokens = reference["output.tokens"].copy()
    tokens[0, 3:] = (tokens[0, 3:] + 1) % 64  # the 4th greedy token on is not this model's
    wrong = write_variant(
        root / "artifacts" / MODEL / "2" / VARIANT,
        signer=signer,
        model=MODEL,
        version=2,
        variant=VARIANT,
        runtime="onnx",
        precision="int8",
        task=manifest.task,
        entrypoint=manifest.entrypoint,
        payload_files={n: good / n for n in ("model.onnx", "tokenizer.json", "generation.json")},
        inputs=INPUTS,
        outputs=OUTPUTS,
        reference={"input.input_ids": reference["input.input_ids"], "output.tokens": tokens},
    )
    return Zoo(good, _unpacked(wrong.path, trusted), public, reference)


def _copy(folder: Path, dest: Path) -> tuple[Path, Manifest]:
    shutil.copytree(folder, dest)
    return dest, read_manifest_unverified(dest)


def test_generative_variant_passes_warm_up_with_the_builds_greedy_tokens(
    zoo: Zoo, tmp_path: Path
) -> None:
    folder, manifest = _copy(zoo.good, tmp_path / "v1")
    assert manifest.task == "generation"
    prompt = [int(t) for t in zoo.reference["input.input_ids"][0]]
    want = [int(t) for t in zoo.reference["output.tokens"][0]]
    assert len(want) == 16

    probe = warm_up(folder, manifest, 1e-3, 1e-3)
    probe.check()  # and again, as the health probe does: the same greedy tokens each time
    assert probe.runner(probe.inputs)["tokens"].tolist() == [want]

    # The app's own generator makes those tokens from the prompt the build encoded.
    app = LocalGenerator.from_variant(folder)
    assert app.encode(PROMPT) == prompt
    app.start(prompt)
    assert [app.step()[0] for _ in want] == want

    # What the warm-up did before it knew generative variants: the runtime loads the graph
    # but cannot feed the KV cache, so the reference run fails.
    plain = load_runner(folder, manifest)
    with pytest.raises(RuntimeBackendError, match="past_key"):
        plain(probe.inputs)


def test_generative_warm_up_failures_say_what_is_wrong(zoo: Zoo, tmp_path: Path) -> None:
    with pytest.raises(WarmupError, match=r"greedy token 3 of 16 .* the reference has"):
        warm_up(zoo.wrong, read_manifest_unverified(zoo.wrong), 1e-3, 1e-3)

    folder, manifest = _copy(zoo.good, tmp_path / "garbled")
    model = folder / "model.onnx"
    model.write_bytes(b"\xff" * model.stat().st_size)  # same size: not re-unpacked
    with pytest.raises(WarmupError, match=r"the generator could not load model\.onnx"):
        warm_up(folder, manifest, 1e-3, 1e-3)

    folder, manifest = _copy(zoo.good, tmp_path / "no-config")
    for name in ("generation.json", "generation.json.zst"):
        (folder / name).unlink()
    missing = r"could not load model\.onnx: FileNotFoundError: .*generation\.json"
    with pytest.raises(WarmupError, match=missing):
        warm_up(folder, manifest, 1e-3, 1e-3)

    folder, manifest = _copy(zoo.good, tmp_path / "no-tokens")
    ids = zoo.reference["input.input_ids"]  # a classifier's reference: logits, not tokens
    logits: dict[str, Any] = {"input.input_ids": ids, "output.logits": ids * 0.5}
    np.savez(folder / "reference.npz", **logits)
    with pytest.raises(WarmupError, match=r"needs input\.input_ids and output\.tokens"):
        warm_up(folder, manifest, 1e-3, 1e-3)

    empty: dict[str, Any] = {
        "input.input_ids": np.zeros((1, 0), np.int64),
        "output.tokens": np.ones((1, 2), np.int64),
    }
    np.savez(folder / "reference.npz", **empty)
    with pytest.raises(WarmupError, match=r"input_ids has shape \(1, 0\)"):
        warm_up(folder, manifest, 1e-3, 1e-3)


def _agent(tmp_path: Path, public_key: Path) -> Agent:
    config = AgentConfig(
        device_id="dev-gen",
        broker=BrokerAddress("127.0.0.1", 1),  # never connected: no broker in this test
        store=tmp_path / "store",
        trusted_keys=(public_key,),
        health_window_s=0.4,
        health_probe_interval_s=0.01,
    )
    agent = Agent(config)
    agent._publish_presence = lambda: None  # type: ignore[method-assign]
    return agent


def _reports(agent: Agent) -> list[tuple[str, int, str]]:
    return [(Kind.Name(r.kind), r.version, r.reason) for r in agent.state.outbox]


def test_generative_variant_activates_passes_its_health_window_and_a_wrong_one_fails(
    zoo: Zoo, tmp_path: Path
) -> None:
    agent = _agent(tmp_path, zoo.public_key)
    store = agent.store
    _copy(zoo.good, store.model_dir(MODEL) / "1" / VARIANT)
    asyncio.run(agent._activate(MODEL, 1, VARIANT, "r1", fresh=True))
    assert _reports(agent) == [("ACTIVATED", 1, "")]
    active = store.read_active(MODEL)
    assert active is not None and (active.version, active.variant) == (1, VARIANT)

    watch = agent._watches[MODEL]
    assert watch.probe is not None and watch.probe.generative
    watch.probe = None  # as after a restart: the health probe loads the generator itself
    time.sleep(0.02)
    asyncio.run(agent._check_health(MODEL, watch))
    assert watch.probe is not None and watch.health.failure is None  # probed, and passed
    assert agent._watches[MODEL] is watch  # the window is still open
    time.sleep(max(0.0, watch.health.remaining(time.time())))
    asyncio.run(agent._check_health(MODEL, watch))
    assert _reports(agent)[-1] == ("HEALTHY", 1, "")

    wrong_dir, _ = _copy(zoo.wrong, store.model_dir(MODEL) / "2" / VARIANT)
    asyncio.run(agent._activate(MODEL, 2, VARIANT, "r2", fresh=True))
    kind, version, reason = _reports(agent)[-1]
    assert (kind, version) == ("FAILED", 2)
    assert reason.startswith("warmup: greedy token 3 of 16 after the reference prompt is ")
    assert not wrong_dir.exists()  # never used: removed from the device
    active = store.read_active(MODEL)
    assert active is not None and active.version == 1  # untouched
