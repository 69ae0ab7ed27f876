"""A griffe extension for the API reference (mkdocs.yml, mkdocstrings' `extensions`): docstrings
say `outputs/<task>/<time>` and `best/<metric>` in prose, which Markdown would pass through as
HTML tags, so the browser would show `outputs//`. Every `<` outside code (`spans`, fenced and
indented blocks) becomes `&lt;`; the docstrings stay as they are in the source."""

from __future__ import annotations

import ast
import re
from typing import Any

import griffe

CODE_SPAN = re.compile(r"(`[^`]*`)")


def literal_angles(text: str) -> str:
    out, fenced = [], False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and not line.startswith("    "):
            parts = CODE_SPAN.split(line)
            parts[::2] = [part.replace("<", "&lt;") for part in parts[::2]]
            line = "".join(parts)
        out.append(line)
    return "\n".join(out)


class LiteralAngles(griffe.Extension):
    def on_instance(self, *, node: ast.AST | griffe.ObjectNode, obj: griffe.Object,
                    agent: griffe.Visitor | griffe.Inspector, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = literal_angles(obj.docstring.value)
