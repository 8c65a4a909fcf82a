"""The README's examples run as written.

A fenced block is tested when the line before it (blank lines aside) is `<!-- test: python -->` or
`<!-- test: bash -->`. All marked blocks run in document order in one fresh temporary directory (so a bash block
can train a run that a later python block loads), with the repository's virtualenv first on PATH and
HF_HUB_OFFLINE=1. Python blocks run as scripts; bash blocks run with `bash -e -o pipefail`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK_TIMEOUT_S = 600
MARKED = re.compile(r"<!--\s*test:\s*(?P<marker>\w+)\s*-->[ \t]*\n(?:[ \t]*\n)*"
                    r"(?P<fence>```+|~~~+)[ \t]*(?P<lang>[\w+-]*)[^\n]*\n(?P<code>.*?)\n[ \t]*(?P=fence)[ \t]*$",
                    re.DOTALL | re.MULTILINE)


@dataclass(frozen=True)
class Block:
    kind: str   # "python" or "bash"
    code: str
    line: int   # line of the opening fence in README.md


def marked_blocks(text: str) -> list[Block]:
    blocks = []
    for m in MARKED.finditer(text):
        marker, lang = m["marker"].lower(), m["lang"].lower()
        if marker not in ("python", "bash"):
            raise ValueError(f"README line {text.count(chr(10), 0, m.start()) + 1}: unknown test marker {marker!r}")
        if lang not in (marker, {"python": "py", "bash": "sh"}[marker], "shell" if marker == "bash" else "python3"):
            raise ValueError(f"README line {text.count(chr(10), 0, m.start()) + 1}: marker `test: {marker}` on a "
                             f"```{lang} block")
        blocks.append(Block(marker, m["code"], text.count("\n", 0, m.start("fence")) + 1))
    return blocks


def test_marked_blocks_are_found_in_order():
    text = ("# t\n<!-- test: bash -->\n```bash\necho one\n```\n\n```python\nprint('not marked')\n```\n"
            "<!-- test: python -->\n\n```python\nimport sys\nprint(2)\n```\n")
    blocks = marked_blocks(text)
    assert [(b.kind, b.code, b.line) for b in blocks] == [("bash", "echo one", 3),
                                                          ("python", "import sys\nprint(2)", 12)]
    with pytest.raises(ValueError, match="marker `test: python` on a ```bash block"):
        marked_blocks("<!-- test: python -->\n```bash\nls\n```\n")


def example_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg")
    return env


def run_block(block: Block, index: int, cwd: Path) -> subprocess.CompletedProcess:
    script = cwd.parent / f"readme_block_{index}_line_{block.line}.{'py' if block.kind == 'python' else 'sh'}"
    script.write_text(block.code + "\n", encoding="utf-8")
    cmd = [sys.executable, str(script)] if block.kind == "python" else ["bash", "-e", "-o", "pipefail", str(script)]
    return subprocess.run(cmd, cwd=cwd, env=example_env(), capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)


@pytest.mark.slow
def test_readme_examples_run(tmp_path):
    if not README.is_file():
        pytest.skip("README.md does not exist yet")
    blocks = marked_blocks(README.read_text(encoding="utf-8"))
    if not blocks:
        pytest.skip("README.md has no blocks marked <!-- test: python --> or <!-- test: bash --> yet")
    cwd = tmp_path / "work"
    cwd.mkdir()
    for index, block in enumerate(blocks):
        result = run_block(block, index, cwd)
        assert result.returncode == 0, (
            f"README.md example at line {block.line} ({block.kind}) exited with {result.returncode}\n"
            f"--- code ---\n{block.code}\n--- stdout (tail) ---\n{result.stdout[-3000:]}\n"
            f"--- stderr (tail) ---\n{result.stderr[-3000:]}")
