"""Every ```python block of README.md and docs/*.md runs as written, on CPU, each in a fresh interpreter.

A block runs as is unless the line just above it is a directive:

    <!-- readme-test: skip (REASON) -->                 not run; REASON is required
    <!-- readme-test: env NAME=VALUE [NAME=VALUE ...] -->  run with these environment variables
    <!-- readme-test: continues the previous block -->  run after the previous block, in its process
    <!-- readme-test: replace "OLD" "NEW" -->            run with OLD (which must occur) replaced by
                                                         NEW: a smaller size for CPU

Clauses combine with ";" (so a reason cannot hold one). Any other readme-test comment fails the
parse, so a block is either run or skipped with a reason.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DIRECTIVE = re.compile(r"^<!--\s*readme-test:\s*(.*?)\s*-->$")


@dataclass
class Program:
    """One interpreter run: a block and the blocks that continue it."""

    lines: list[int]  # README line of each block's opening fence
    code: str
    env: dict[str, str] = field(default_factory=dict)
    skip: str | None = None


def parse(text: str, source: str = "README.md") -> list[Program]:
    programs: list[Program] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() != "```python":
            i += 1
            continue
        start = i
        j = i + 1
        while lines[j].strip() != "```":
            j += 1
        where = f"{source}:{start + 1}"
        code = "\n".join(lines[start + 1 : j]) + "\n"
        prev = next((lines[k].strip() for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        m = DIRECTIVE.match(prev)
        prog = Program([start + 1], "")
        continues = False
        for clause in [c.strip() for c in m.group(1).split(";")] if m else []:
            if clause == "continues the previous block":
                if not programs:
                    raise ValueError(f"{where}: 'continues the previous block' needs a block before it")
                continues = True
            elif clause.startswith("skip"):
                reason = re.fullmatch(r"skip \((.+)\)", clause)
                if not reason:
                    raise ValueError(f"{where}: write the reason: <!-- readme-test: skip (why) -->")
                prog.skip = reason.group(1)
            elif clause.startswith("env"):
                pairs = clause.split()[1:]
                if not pairs or not all("=" in p for p in pairs):
                    raise ValueError(f"{where}: expected env NAME=VALUE ..., got {clause!r}")
                prog.env.update(p.split("=", 1) for p in pairs)
            elif clause.startswith("replace"):
                old_new = re.fullmatch(r'replace "([^"]+)" "([^"]*)"', clause)
                if not old_new or old_new.group(1) not in code:
                    raise ValueError(f'{where}: {clause!r} must be replace "OLD" "NEW" with OLD in the block')
                code = code.replace(old_new.group(1), old_new.group(2))
            else:
                raise ValueError(f"{where}: unknown readme-test directive {clause!r}")
        if continues:
            programs[-1].lines.append(start + 1)
            programs[-1].code += code
        else:
            prog.code = code
            programs.append(prog)
        i = j + 1
    return programs


DOCS = ["README.md"] + sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))
PROGRAMS = [(doc, prog) for doc in DOCS for prog in parse((ROOT / doc).read_text(), doc)]


@pytest.mark.parametrize("doc, prog", PROGRAMS, ids=lambda x: x if isinstance(x, str) else "+".join(map(str, x.lines)))
def test_readme_block_runs(doc, prog, tmp_path):
    if prog.skip:
        pytest.skip(prog.skip)
    env = dict(os.environ, JAX_PLATFORMS="cpu", **prog.env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", prog.code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"{doc}:{prog.lines} failed:\n{prog.code}\n{proc.stderr[-3000:]}"


def test_readme_has_python_blocks():
    readme = [p for doc, p in PROGRAMS if doc == "README.md"]
    assert len(readme) >= 2 and all(p.skip is None for p in readme)
    assert len(PROGRAMS) >= 4


@pytest.mark.parametrize(
    "text, error",
    [
        ("<!-- readme-test: skip -->\n```python\nx\n```\n", "write the reason"),
        ("<!-- readme-test: run it -->\n```python\nx\n```\n", "unknown readme-test directive"),
        ("<!-- readme-test: env FOO -->\n```python\nx\n```\n", "expected env NAME=VALUE"),
        ("<!-- readme-test: continues the previous block -->\n```python\nx\n```\n", "needs a block before it"),
        ('<!-- readme-test: replace "y" "z" -->\n```python\nx\n```\n', "with OLD in the block"),
    ],
)
def test_bad_directives_fail(text, error):
    with pytest.raises(ValueError, match=error):
        parse(text)


def test_directives_parse():
    text = (
        "```python\na = 1\n```\n<!-- readme-test: continues the previous block -->\n```python\nb = a\n```\n"
        '<!-- readme-test: env A=1 B=x=y; replace "n = 9" "n = 2" -->\n\n```python\nn = 9\n```\n'
        "<!-- readme-test: skip (needs a GPU) -->\n```python\nd\n```\n"
    )
    progs = parse(text)
    assert [(p.lines, p.code, p.env, p.skip) for p in progs] == [
        ([1, 5], "a = 1\nb = a\n", {}, None),
        ([10], "n = 2\n", {"A": "1", "B": "x=y"}, None),
        ([14], "d\n", {}, "needs a GPU"),
    ]


def test_pip_extras_are_quoted():
    """zsh globs an unquoted `.[test]`: every pip install of an extra in README.md quotes it."""
    text = (ROOT / "README.md").read_text()
    installs = re.findall(r"pip install[^\n`]*", text)
    assert installs
    for cmd in installs:
        for word in re.findall(r"\S*\[[\w,-]+\]\S*", cmd.split("#")[0]):
            assert word[0] in "\"'", cmd
