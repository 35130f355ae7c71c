"""Run every benchmark: each ``benchmarks/*.py`` module with a top-level ``main(argv)``.

``python -m benchmarks.run_all [--quick] [--only NAME ...] [--list]``

Modules run one after another, each in its own Python process (a benchmark that starts
servers or threads cannot disturb the next one's timings), and each writes its own
``results/<name>.json|png`` and summary rows. A failing benchmark is reported and the
others still run; the exit status is non-zero if any failed.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import BENCH_DIR

EXCLUDED = frozenset({"__init__", "common", "run_all"})

# Runs main(argv) whether or not the module has an ``if __name__ == "__main__"`` block.
_LAUNCH = "import sys, importlib; sys.exit(importlib.import_module(sys.argv[1]).main(sys.argv[2:]))"


def defines_main(path: Path) -> bool:
    """True if the module defines a top-level function ``main`` (read, not imported)."""
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except (OSError, SyntaxError, ValueError):
        return False
    return any(
        isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == "main"
        for node in tree.body
    )


def discover(directory: Path = BENCH_DIR) -> list[str]:
    """Names of the benchmark modules in ``directory``, sorted (core first: the reference)."""
    names = [
        p.stem
        for p in directory.glob("*.py")
        if p.stem not in EXCLUDED and not p.stem.startswith("_") and defines_main(p)
    ]
    return sorted(names, key=lambda n: (n != "core", n))


def run_one(name: str, quick: bool, package: str = "benchmarks") -> int:
    """Run ``<package>.<name>.main`` in a fresh interpreter; its exit status."""
    argv = ["--quick"] if quick else []
    cmd = [sys.executable, "-c", _LAUNCH, f"{package}.{name}", *argv]
    return subprocess.run(cmd, cwd=BENCH_DIR.parent, check=False).returncode


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    parser.add_argument(
        "--only", action="append", metavar="NAME", help="run only this benchmark (repeatable)"
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    names = discover()
    if args.list:
        print("\n".join(names))
        return 0
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            parser.error(f"unknown benchmark(s) {unknown}; known: {names}")
        names = [n for n in names if n in args.only]
    failed: list[str] = []
    for name in names:
        print(f"== {name}{' (quick)' if args.quick else ''}", flush=True)
        started = time.perf_counter()
        status = run_one(name, args.quick)
        elapsed = time.perf_counter() - started
        print(
            f"== {name}: {'ok' if status == 0 else f'FAILED (exit {status})'} in {elapsed:.1f} s",
            flush=True,
        )
        if status != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
