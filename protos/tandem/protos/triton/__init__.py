"""Triton's model configuration schema (model_config.proto, vendored, BSD-3-Clause), used to
read a Triton model repository's config.pbtxt files."""
