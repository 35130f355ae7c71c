"""The README's Python example runs as written against a real server."""

from __future__ import annotations

import re
from pathlib import Path

from allocator.server import Running

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(server: Running, capsys: object) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has a Python example"
    code = blocks[0].replace("127.0.0.1:50051", f"127.0.0.1:{server.port}")
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    assert 'name: "control"' in out
    assert sum(server.app.engine.counts("ranker").values()) == 1001
