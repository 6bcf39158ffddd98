"""Generate the Python gRPC code of proto/xmag/v1/ into service/grpc_api/ (committed), or check that it is current.

    python proto/generate.py           # regenerate
    python proto/generate.py --check   # exit 1 if the committed code differs from what the protos give

Needs grpcio-tools (a dev dependency); the service itself needs only grpcio and protobuf.
The protos are compiled with proto/ as the include root, so descriptors and
reflection name them `xmag/v1/...`; the one import the generator writes for
that layout is pointed at `xmag.service.grpc_api`, where the modules live (a
top-level `xmag.v1` package would collide with the core package `xmag`).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "proto"
PROTO_DIR = PROTO_ROOT / "xmag" / "v1"
TARGET = REPO_ROOT / "service" / "grpc_api"
HEADER = '"""Generated from proto/xmag/v1 by proto/generate.py; do not edit."""\n'


def generate(target: Path) -> list[Path]:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as scratch:
        protos = sorted(PROTO_DIR.glob("*.proto"))
        arguments = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={scratch}",
            f"--pyi_out={scratch}",
            f"--grpc_python_out={scratch}",
            *[str(proto) for proto in protos],
        ]
        if protoc.main(arguments) != 0:
            raise SystemExit("protoc failed")
        target.mkdir(parents=True, exist_ok=True)
        written = []
        for generated in sorted((Path(scratch) / "xmag" / "v1").iterdir()):
            text = generated.read_text().replace("from xmag.v1 import", "from xmag.service.grpc_api import")
            path = target / generated.name
            path.write_text(text)
            written.append(path)
        init = target / "__init__.py"
        init.write_text(HEADER)
        return [init, *written]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed code instead of writing it")
    arguments = parser.parse_args()
    if not arguments.check:
        for path in generate(TARGET):
            print(f"wrote {path.relative_to(REPO_ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        fresh = generate(Path(scratch))
        stale = [
            path.name
            for path in fresh
            if not (TARGET / path.name).is_file() or not filecmp.cmp(path, TARGET / path.name, shallow=False)
        ]
        extra = sorted({p.name for p in TARGET.glob("*.py*")} - {p.name for p in fresh})
    if stale or extra:
        print(
            f"service/grpc_api is not current (differs: {stale}; not generated: {extra}); run python proto/generate.py"
        )
        return 1
    print("service/grpc_api is current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
