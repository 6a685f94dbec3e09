"""`tandem infer`: one SDK call from the command line, for trying a model.

tandem infer --model digits --artifacts build/zoo/artifacts --input pixels.npy
tandem infer --model digits --cloud localhost:8001 --policy cloud_only --values 0,0,5,...
tandem infer --model digits --artifacts A --cloud H:P --policy cascade --set threshold=0.9
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from tandem.errors import ConfigError, InputError

app = typer.Typer(
    help="Run one inference through the SDK (local runtime and/or cloud tier).",
    add_completion=False,
    pretty_exceptions_enable=False,
)
log = logging.getLogger(__name__)


def _parse_setting(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError("--set", f"expected key=value, got {text!r}")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


def _load_inputs(paths: list[str], values: str | None, names: tuple[str, ...]) -> Any:
    if values is not None:
        return np.array([float(v) for v in values.split(",") if v.strip()], dtype=np.float64)
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    for item in paths:
        name, sep, path_text = item.partition("=")
        if not sep:
            name, path_text = "", item
        path = Path(path_text)
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                inputs.update({k.removeprefix("input."): data[k] for k in data.files})
            continue
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        elif path.suffix == ".json":
            array = np.asarray(json.loads(path.read_text()))
        else:
            raise InputError(f"{path}: use a .npy, .npz or .json file")
        if not name:
            if len(names) != 1:
                raise InputError(f"the model has inputs {list(names)}: write name=PATH")
            name = names[0]
        inputs[name] = array
    if not inputs:
        raise InputError("give --input PATH (npy/npz/json) or --values v1,v2,...")
    return inputs


def _cast(inputs: Any, client: Any) -> Any:
    """Plain numbers from the command line take the model's dtypes."""
    signature = client.signature()
    if signature is None:
        return inputs
    dtypes = {t.name: t.dtype for t in signature.inputs}
    if isinstance(inputs, np.ndarray):
        return inputs.astype(signature.inputs[0].dtype)
    return {k: (v.astype(dtypes[k]) if k in dtypes else v) for k, v in inputs.items()}


@app.callback(invoke_without_command=True)
def infer(
    model: Annotated[str, typer.Option("--model", "-m", help="Model name.")],
    artifacts: Annotated[
        Path | None, typer.Option(help="Local model store or a build's artifacts/ folder.")
    ] = None,
    cloud: Annotated[
        list[str] | None, typer.Option(help="Cloud endpoint host:port (repeatable).")
    ] = None,
    policy: Annotated[str, typer.Option(help="Routing policy name.")] = "prefer_local",
    setting: Annotated[
        list[str] | None,
        typer.Option("--set", help="Policy setting key=value (repeatable), e.g. threshold=0.9."),
    ] = None,
    runtime: Annotated[str, typer.Option(help="auto, a runtime or a variant name.")] = "auto",
    input_paths: Annotated[
        list[str] | None,
        typer.Option("--input", "-i", help="\\[name=]PATH of a .npy/.json, or a .npz by name."),
    ] = None,
    values: Annotated[
        str | None, typer.Option(help="Comma-separated numbers for a single-input model.")
    ] = None,
    token: Annotated[
        str | None, typer.Option(envvar="TANDEM_TOKEN", help="Bearer token for the cloud.")
    ] = None,
    tls: Annotated[bool, typer.Option(help="Use TLS to the cloud.")] = False,
    repeat: Annotated[int, typer.Option(help="Calls to make (timings of the last shown).")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Run one inference and show where it was answered, its outputs and timings."""
    from tandem.sdk.client import Client

    settings = dict(_parse_setting(s) for s in setting or [])
    with Client(
        model=model,
        artifacts=artifacts,
        cloud=cloud or None,
        policy=policy,
        runtime=runtime,
        token=token,
        tls=tls,
        **settings,
    ) as client:
        signature = client.signature()
        names = signature.input_names if signature is not None else ()
        inputs = _cast(_load_inputs(input_paths or [], values, names), client)
        result = None
        for _ in range(max(1, repeat)):
            result = client.infer(inputs)
        assert result is not None
        summary: dict[str, Any] = {
            "source": result.source,
            "runtime": result.runtime,
            "model_version": result.model_version,
            "endpoint": result.endpoint,
            "confidence": result.confidence,
            "fallback": result.fallback,
            "escalated": result.escalated,
            "timings_ms": result.timings,
            "outputs": {k: v.tolist() for k, v in result.outputs.items()},
        }
        logits = signature.logits_name if signature is not None else None
        if logits is not None and logits in result.outputs:
            summary["top_class"] = result.outputs[logits].argmax(axis=-1).tolist()
        if as_json:
            typer.echo(json.dumps(summary))
            return
        table = Table(title=f"{model}: {policy}", show_header=False)
        for key, value in summary.items():
            if key == "outputs":
                value = {
                    k: f"{np.asarray(v).shape} {np.asarray(v).ravel()[:6].round(4)}"
                    for k, v in value.items()
                }
            table.add_row(key, str(value))
        Console().print(table)
