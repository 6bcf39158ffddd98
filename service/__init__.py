"""The XMAG inference service: one engine, two faces (REST and gRPC)."""
