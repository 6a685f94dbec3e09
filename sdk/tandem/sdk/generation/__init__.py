"""On-device text generation from a signed generative variant (numpy, onnxruntime, tokenizers).

`LocalGenerator` decodes greedily with a KV cache and streams tokens; `draft(k)` and
`accept(n, correction)` are the speculative-decoding half a cloud verifier drives. See
docs/generation-device.md.
"""

from tandem.sdk.generation.generator import GENERATION_FILE, GeneratedToken, LocalGenerator

__all__ = ["GENERATION_FILE", "GeneratedToken", "LocalGenerator"]
