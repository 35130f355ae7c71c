"""Regenerate the gRPC stubs in ``allocator_client/v1`` from ``proto/``.

Run from a checkout: ``python -m allocator_client.codegen [--out DIR] [--check]``.

protoc names the message module after the proto package, so the grpc stub says
``from allocator.v1 import allocator_pb2``; that would resolve to the server's top-level
``allocator`` package, so the import is rewritten to a relative one.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

PROTO_FILE = "allocator/v1/allocator.proto"
GENERATED_FILES = ("allocator_pb2.py", "allocator_pb2.pyi", "allocator_pb2_grpc.py")
INIT_FILE = "__init__.py"
INIT_TEXT = (
    '"""Stubs generated from proto/allocator/v1/allocator.proto by allocator_client.codegen.\n'
    "\n"
    "Do not edit: run `make proto` (python -m allocator_client.codegen).\n"
    '"""\n'
)
_ABSOLUTE_IMPORT = "from allocator.v1 import allocator_pb2 as "
_RELATIVE_IMPORT = "from . import allocator_pb2 as "
_PROTOC_MODULE = "'allocator.v1.allocator_pb2'"
_PACKAGE_MODULE = "'allocator_client.v1.allocator_pb2'"


class CodegenError(RuntimeError):
    """protoc failed or produced something unexpected."""

    def __init__(self, message: str, *, returncode: int = 0, stderr: str = "") -> None:
        super().__init__(f"{message}\n{stderr}".rstrip())
        self.returncode = returncode
        self.stderr = stderr


def default_proto_root() -> Path:
    """``proto/`` of the checkout this file lives in (clients/python/../../proto)."""
    return Path(__file__).resolve().parents[3] / "proto"


def default_out_dir() -> Path:
    """The ``allocator_client/v1`` package next to this file."""
    return Path(__file__).resolve().parent / "v1"


def _replace_once(source: str, old: str, new: str, where: str) -> str:
    count = source.count(old)
    if count != 1:
        raise CodegenError(f"expected one {old!r} in {where}, found {count}")
    return source.replace(old, new)


def relativize_imports(grpc_source: str) -> str:
    """Rewrite the grpc stub's absolute import of the message module to a relative one."""
    return _replace_once(grpc_source, _ABSOLUTE_IMPORT, _RELATIVE_IMPORT, "the grpc stub")


def rename_module(pb2_source: str) -> str:
    """Give the message classes their real ``__module__``, so pickling them never imports
    the server's ``allocator`` package."""
    return _replace_once(pb2_source, _PROTOC_MODULE, _PACKAGE_MODULE, "the message module")


def _protoc_command(proto_root: Path, out: Path) -> list[str]:
    well_known = resources.files("grpc_tools") / "_proto"
    return [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        PROTO_FILE,
    ]


def generate(proto_root: Path | None = None) -> dict[str, bytes]:
    """Run protoc in a scratch directory; return file name -> content of the v1 package."""
    root = default_proto_root() if proto_root is None else proto_root
    if not (root / PROTO_FILE).is_file():
        raise CodegenError(f"{root / PROTO_FILE} not found")
    with tempfile.TemporaryDirectory(prefix="allocator-codegen-") as scratch:
        # A subprocess keeps grpc_tools' import hooks out of the caller's interpreter, and
        # running it from the proto root keeps every path protoc records relative.
        proc = subprocess.run(
            _protoc_command(root, Path(scratch)),
            cwd=root,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise CodegenError("protoc failed", returncode=proc.returncode, stderr=proc.stderr)
        emitted = Path(scratch) / Path(PROTO_FILE).parent
        files = {name: (emitted / name).read_bytes() for name in GENERATED_FILES}
    pb2_name, _, grpc_name = GENERATED_FILES
    files[pb2_name] = rename_module(files[pb2_name].decode()).encode()
    files[grpc_name] = relativize_imports(files[grpc_name].decode()).encode()
    files[INIT_FILE] = INIT_TEXT.encode()
    return files


def write(files: Mapping[str, bytes], out_dir: Path) -> list[Path]:
    """Write the files into ``out_dir``; return the ones whose content changed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    changed = []
    for name in sorted(files):
        path = out_dir / name
        if not path.is_file() or path.read_bytes() != files[name]:
            path.write_bytes(files[name])
            changed.append(path)
    return changed


def stale(files: Mapping[str, bytes], out_dir: Path) -> list[str]:
    """Names of the files in ``out_dir`` that differ from ``files`` (or are missing)."""
    return [
        name
        for name in sorted(files)
        if not (out_dir / name).is_file() or (out_dir / name).read_bytes() != files[name]
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m allocator_client.codegen")
    parser.add_argument("--out", type=Path, default=None, help="output dir (default: v1/)")
    parser.add_argument("--proto-root", type=Path, default=None, help="dir holding allocator/")
    parser.add_argument("--check", action="store_true", help="exit 1 if the stubs are stale")
    args = parser.parse_args(argv)
    out_dir = default_out_dir() if args.out is None else args.out
    try:
        files = generate(args.proto_root)
    except CodegenError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.check:
        names = stale(files, out_dir)
        for name in names:
            print(f"stale: {out_dir / name}", file=sys.stderr)
        return 1 if names else 0
    for path in write(files, out_dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
