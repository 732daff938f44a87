"""Signature readers shared by the API tests: class Buffer's parameters as written in the installed
deep_ep/buffer.py (read as source, so they are checked without torch), and a nanobind method's parameters
as nanobind records them."""

import ast
import importlib.util
import pathlib
import re

import pytest


class _Required:
    def __repr__(self):
        return "<required>"


REQUIRED = _Required()  # stands for "no default"


def buffer_source_methods():
    """{name: [(parameter, default or REQUIRED)]} of class Buffer in the installed deep_ep/buffer.py; self (not
    present on static methods) is left out."""
    spec = importlib.util.find_spec("deep_ep")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the deep_ep package is not installed")
    source = pathlib.Path(list(spec.submodule_search_locations)[0]) / "buffer.py"
    tree = ast.parse(source.read_text(), filename=str(source))
    buffer_class = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Buffer")
    methods = {}
    for node in buffer_class.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        positional = node.args.args
        defaults = [REQUIRED] * (len(positional) - len(node.args.defaults)) + [
            ast.literal_eval(d) for d in node.args.defaults
        ]
        params = list(zip((a.arg for a in positional), defaults))
        is_static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in node.decorator_list)
        methods[node.name] = params if is_static else params[1:]
    return methods


def binding_parameters(function):
    """[(name, default text or None)] of a nanobind method, self left out, from the signature line nanobind
    writes at the top of its docstring."""
    text = function.__doc__.splitlines()[0]
    inside = text[text.index("(") + 1 : text.rindex(") ->")]
    # Annotations such as Callable[[str, str], ...] hold commas: drop bracketed parts first.
    while True:
        flattened = re.sub(r"\[[^\[\]]*\]", "", inside)
        if flattened == inside:
            break
        inside = flattened
    params = []
    for part in inside.split(","):
        if part.strip():
            name = part.split(":")[0].split("=")[0].strip()
            params.append((name, part.split("=")[1].strip() if "=" in part else None))
    return [p for p in params if p[0] != "self"]
