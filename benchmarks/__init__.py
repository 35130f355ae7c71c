"""Runnable benchmarks: each module's ``main(argv)`` writes ``results/<name>.json|png``.

Run one with ``python -m benchmarks.<name> [--quick]`` or all with
``python -m benchmarks.run_all [--quick]``; shared helpers live in :mod:`benchmarks.common`.
"""
