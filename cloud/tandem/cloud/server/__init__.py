"""The cloud inference server: an Open Inference Protocol (V2) server with dynamic batching.

`tandem serve --repository DIR` serves every model of a repository written by
`tandem models build` over gRPC (`inference.GRPCInferenceService`, wire-compatible with Triton
and KServe clients) and HTTP/REST, batches concurrent requests per model, and exports
Prometheus metrics. The pieces, from the wire inwards:

- `grpc_service` / `http_api`: protocol adapters; they decode tensors, call the repository and
  translate `tandem` errors to gRPC status codes or HTTP status codes.
- `repository`: which models and versions are loaded (version policy, polling, explicit load).
- `batcher`: the per-version dynamic batcher with a bounded queue and per-request deadlines.
- `backends`: onnxruntime, TorchScript and OpenVINO behind one small interface.
- `tensors`: pure decoding and validation of V2 tensors (no IO).
"""

from __future__ import annotations
