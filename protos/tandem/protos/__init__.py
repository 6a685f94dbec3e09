"""Wire contracts: the Open Inference Protocol (V2) gRPC service and the fleet messages.

The generated modules are committed; `python -m tandem.protos.generate` rewrites them and
`tests/test_protos.py` fails when they are out of date. Devices never need grpcio-tools.
"""
