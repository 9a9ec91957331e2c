"""The library stays readable: small modules and functions, and code comments that say why rather
than what a bench measured (measured figures live in docs/results.md)."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

LIBRARY = Path(__file__).resolve().parent.parent / "lqae"
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 450, 80
# a number with a unit of measurement: "0.5 dB", "12%", "1.4x" (a range such as "40-100%" is a setting)
MEASURED = re.compile(r"(?<![-\d.])\d+(\.\d+)?\s?(dB\b|%|x\b)")


def modules() -> list[Path]:
    return sorted(LIBRARY.rglob("*.py"))


def test_no_module_is_longer_than_450_lines():
    long = {str(p.relative_to(LIBRARY)): n for p in modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(LIBRARY)}:{node.name}")
    assert long == []


def test_no_measured_figure_in_a_comment_or_docstring():
    found = []
    for path in modules():
        for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if token.type == tokenize.COMMENT or (token.type == tokenize.STRING and token.string.endswith('"""')):
                for match in MEASURED.finditer(token.string):
                    if match.group(0) != "95%":  # the confidence level of an interval, not a measurement
                        found.append(f"{path.relative_to(LIBRARY)}:{token.start[0]}: {match.group(0)}")
    assert found == []
