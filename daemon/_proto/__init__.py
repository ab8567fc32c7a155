"""Generated gRPC stubs for containerd's Tasks API and the CRI v1 RuntimeService.

The .proto files here are the project's own minimal subsets with the upstream package names and
field numbers; regenerate with scripts/gen_protos.sh (never edit the *_pb2* files by hand).
"""
