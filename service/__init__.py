"""The XMAG inference service: one engine, REST (and later gRPC) faces."""
