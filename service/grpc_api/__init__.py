"""Generated from proto/xmag/v1 by proto/generate.py; do not edit."""
