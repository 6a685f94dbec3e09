"""gRPC surfaces of the generative models, called by the server's InferenceServicer:

- `ModelStreamInfer` (Triton's streaming extension): each request carries `text_input`
  (BYTES [1]) or `input_ids` (INT64 [n]) and the parameters max_tokens, temperature, top_p,
  seed, ignore_eos (as request parameters, or as one-value input tensors of those names, as
  Triton's TensorRT-LLM models take them; `random_seed` is seed); the answer is one response
  per token (outputs `text_output` BYTES [1], `token_id` INT64 [1]), then a last one with
  the parameters `triton_final_response: true` and `finish_reason`. An error answers that
  request in `error_message`; the stream goes on, except while the server shuts down: then
  the call ends with UNAVAILABLE ("server shutting down").
- the verify call, as `ModelInfer` on the generative model with Triton's sequence parameters:
  `sequence_id` (string or int), `sequence_start`, `sequence_end` (bool); inputs `draft_ids`
  (INT64 [k], may be empty) and, with sequence_start, `prompt_ids` (INT64 [n]); outputs
  `accepted` and `next_token` (INT64 [1] each).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from tandem.cloud.server.errors import InvalidInputError, ModelUnavailableError
from tandem.errors import CloudServerError
from tandem.protos.inference import grpc_predict_v2_pb2 as pb

from .engine import Done
from .service import GenerationService


def _param(params: Any, name: str) -> Any:
    if name not in params:
        return None
    p = params[name]
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


# The scalar inputs a generation request may carry as tensors (as Triton's TensorRT-LLM and
# vLLM models take them) instead of parameters: (datatype, numpy dtype, contents field).
_NUMERIC = {
    "INT64": ("<i8", "int64_contents"),
    "INT32": ("<i4", "int_contents"),
    "UINT64": ("<u8", "uint64_contents"),
    "UINT32": ("<u4", "uint_contents"),
    "FP32": ("<f4", "fp32_contents"),
    "FP64": ("<f8", "fp64_contents"),
    "BOOL": ("?", "bool_contents"),
}
SAMPLING = ("max_tokens", "temperature", "top_p", "seed", "ignore_eos")
# Tensor names that mean a sampling parameter (random_seed: TensorRT-LLM's name for seed).
SAMPLING_TENSORS = {**{k: k for k in SAMPLING}, "random_seed": "seed"}


def _inputs(request: pb.ModelInferRequest) -> dict[str, Any]:
    """The request's tensors by name: numbers as lists of Python numbers, BYTES as lists of
    bytes."""
    out: dict[str, Any] = {}
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInputError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    for i, tensor in enumerate(request.inputs):
        if tensor.datatype in _NUMERIC:
            dtype, contents = _NUMERIC[tensor.datatype]
            if raw:
                size = np.dtype(dtype).itemsize
                if len(raw[i]) % size:
                    raise InvalidInputError(
                        f"input {tensor.name!r}: raw size is not {size}*n", tensor.name
                    )
                out[tensor.name] = np.frombuffer(raw[i], dtype=dtype).tolist()
            else:
                out[tensor.name] = list(getattr(tensor.contents, contents))
        elif tensor.datatype == "BYTES":
            if raw:
                data, items = raw[i], []
                while data:
                    n = int.from_bytes(data[:4], "little")
                    items.append(bytes(data[4 : 4 + n]))
                    data = data[4 + n :]
                out[tensor.name] = items
            else:
                out[tensor.name] = list(tensor.contents.bytes_contents)
        else:
            raise InvalidInputError(
                f"input {tensor.name!r}: datatype {tensor.datatype} is not served here",
                tensor.name,
            )
    return out


def _sampling(request: pb.ModelInferRequest, tensors: dict[str, Any]) -> dict[str, Any]:
    """Sampling parameters from the request's parameters, or from scalar input tensors of the
    same names; a parameter wins over a tensor."""
    params: dict[str, Any] = {}
    for tensor_name, name in SAMPLING_TENSORS.items():
        if tensor_name in tensors:
            values = tensors[tensor_name]
            if len(values) != 1:
                raise InvalidInputError(f"input {tensor_name!r} must hold one value", tensor_name)
            params[name] = values[0]
    for name in SAMPLING:
        if name in request.parameters:
            params[name] = _param(request.parameters, name)
    return params


def _int64(response: pb.ModelInferResponse, name: str, value: int) -> None:
    out = response.outputs.add()
    out.name, out.datatype = name, "INT64"
    out.shape.append(1)
    out.contents.int64_contents.append(value)


async def stream_infer(
    service: GenerationService, requests: AsyncIterator[pb.ModelInferRequest]
) -> AsyncIterator[pb.ModelStreamInferResponse]:
    async for request in requests:
        try:
            model = service.get(request.model_name)
            tensors = _inputs(request)
            sampling = model.params(_sampling(request, tensors))
            if "input_ids" in tensors:
                prompt = model.engine.check_tokens(tensors["input_ids"], "input_ids")
            elif len(tensors.get("text_input", ())) == 1:
                prompt = model.encode(tensors["text_input"][0].decode("utf-8", "replace"))
            else:
                raise InvalidInputError("give text_input (BYTES [1]) or input_ids (INT64 [n])")
            tokens = model.generate(prompt, sampling, kind="stream")
        except CloudServerError as exc:
            service.rejected(request.model_name, "stream", exc)
            if isinstance(exc, ModelUnavailableError):
                raise  # shutting down: the call ends with UNAVAILABLE
            yield pb.ModelStreamInferResponse(error_message=str(exc))
            continue
        try:
            async for item in tokens:
                response = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
                if isinstance(item, Done):
                    response.parameters["triton_final_response"].bool_param = True
                    response.parameters["finish_reason"].string_param = item.reason
                    yield pb.ModelStreamInferResponse(infer_response=response)
                    break
                response.parameters["triton_final_response"].bool_param = False
                text = response.outputs.add()
                text.name, text.datatype = "text_output", "BYTES"
                text.shape.append(1)
                text.contents.bytes_contents.append(item[1].encode())
                _int64(response, "token_id", item[0])
                yield pb.ModelStreamInferResponse(infer_response=response)
        except ModelUnavailableError:
            raise
        except CloudServerError as exc:
            yield pb.ModelStreamInferResponse(error_message=str(exc))
        finally:
            await tokens.aclose()  # type: ignore[attr-defined]


async def verify_infer(
    service: GenerationService, request: pb.ModelInferRequest
) -> pb.ModelInferResponse:
    """The verify call over ModelInfer; raises the server's errors for the caller to map."""
    try:
        model = service.get(request.model_name)
        tensors = _inputs(request)
        sequence_id = _param(request.parameters, "sequence_id")
        if sequence_id is None or sequence_id == "" or sequence_id == 0:
            raise InvalidInputError("the verify call needs the parameter sequence_id")
        result = await model.verify(
            str(sequence_id),
            tensors.get("draft_ids", []),
            start=bool(_param(request.parameters, "sequence_start")),
            prompt=tensors.get("prompt_ids", []),
            end=bool(_param(request.parameters, "sequence_end")),
        )
    except CloudServerError as exc:
        service.rejected(request.model_name, "verify", exc)
        raise
    response = pb.ModelInferResponse(
        model_name=request.model_name, model_version="1", id=request.id
    )
    _int64(response, "accepted", result.accepted)
    _int64(response, "next_token", result.next_token)
    return response
