"""The fenced code blocks of the README and docs/, as the tests that run them read them: each example
is a block right after an ``<!-- example: NAME -->`` line; a ```text block that follows an example
(with only prose between) is that example's output."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MARKER = re.compile(r"<!-- example: ([\w-]+) -->")


@dataclass
class Block:
    """A fenced block: its language, text, the example marker on the line before it, and for a ```text
    block right after an example (only prose between), the example it is the output of."""

    language: str
    text: str
    name: str | None
    output_of: str | None = None


def blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    found: list[Block] = []
    between: list[str] = []  # the lines since the last block
    at = 0
    while at < len(lines):
        line = lines[at]
        if not line.startswith("```"):
            between.append(line)
            at += 1
            continue
        end = lines.index("```", at + 1)
        marker = MARKER.fullmatch(lines[at - 1]) if at else None
        block = Block(line[3:].strip(), "\n".join(lines[at + 1 : end]) + "\n", marker and marker.group(1))
        previous = found[-1] if found else None
        if (
            block.name is None
            and block.language == "text"
            and previous is not None
            and previous.name is not None
            and not any(MARKER.search(prose) for prose in between)
        ):
            block.output_of = previous.name
        found.append(block)
        between = []
        at = end + 1
    return found


def example(path: Path, name: str) -> Block:
    """The example ``name`` of ``path`` (exactly one)."""
    (block,) = [b for b in blocks(path) if b.name == name]
    return block


def output(path: Path, name: str) -> str:
    """The ```text output shown after the example ``name``."""
    (block,) = [b for b in blocks(path) if b.output_of == name]
    return block.text


def commands(path: Path, name: str) -> list[str]:
    """The commands of a console example: its ``$`` lines, without their comments."""
    lines = [line[2:] for line in example(path, name).text.splitlines() if line.startswith("$ ")]
    return [line.split("  #", 1)[0].strip() for line in lines]
