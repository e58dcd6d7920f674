"""Request validation against Firecracker's OpenAPI (Swagger 2.0) description.

Like Firecracker itself the fake rejects unknown fields (``additionalProperties: false`` on every
object that lists its properties) and wrong types; PATCH bodies are validated without ``required``.
"""

from __future__ import annotations

import copy
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SPEC_PATH = Path(os.environ.get("SMARTVM_FIRECRACKER_SPEC", "/work/shared/firecracker/firecracker.yaml"))
if not SPEC_PATH.exists():  # fresh clones: the spec sits next to the repository
    SPEC_PATH = Path(__file__).resolve().parents[4] / "shared" / "firecracker" / "firecracker.yaml"


class _Yaml12Loader(yaml.SafeLoader):
    """YAML 1.1 turns the log level ``Off`` into ``False``; Firecracker reads it as the string."""


_Yaml12Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|false)$"), list("tf"))


@dataclass(frozen=True)
class Operation:
    method: str
    template: str
    pattern: re.Pattern[str]
    path_param: str | None
    body_schema: dict[str, Any] | None
    summary: str


def _close_objects(node: Any) -> Any:
    """Add ``additionalProperties: false`` to every object schema with listed properties."""
    if isinstance(node, dict):
        out = {k: _close_objects(v) for k, v in node.items()}
        if "properties" in node and "additionalProperties" not in node:
            out["additionalProperties"] = False
        if "properties" in node:  # property names are not schemas
            out["properties"] = {k: _close_objects(v) for k, v in node["properties"].items()}
        return out
    if isinstance(node, list):
        return [_close_objects(v) for v in node]
    return node


@functools.cache
def load_spec() -> dict[str, Any]:
    with SPEC_PATH.open() as f:
        spec: dict[str, Any] = yaml.load(f, Loader=_Yaml12Loader)
    return spec


@functools.cache
def operations() -> tuple[Operation, ...]:
    spec = load_spec()
    definitions = _close_objects(spec["definitions"])
    ops = []
    for template, methods in spec["paths"].items():
        param_names = re.findall(r"{(\w+)}", template)
        regex = "^" + re.sub(r"{(\w+)}", r"(?P<\1>[^/]+)", template) + "$"
        for method, op in methods.items():
            body_schema = None
            for param in op.get("parameters", []):
                if param.get("in") == "body":
                    schema = copy.deepcopy(param["schema"])
                    if "$ref" in schema:
                        name = schema["$ref"].rsplit("/", 1)[1]
                        schema = copy.deepcopy(definitions[name])
                    if method == "patch":
                        schema.pop("required", None)
                    schema["definitions"] = definitions
                    body_schema = schema
            ops.append(
                Operation(
                    method=method.upper(),
                    template=template,
                    pattern=re.compile(regex),
                    path_param=param_names[0] if param_names else None,
                    body_schema=body_schema,
                    summary=op.get("summary", ""),
                )
            )
    return tuple(ops)


class SpecError(Exception):
    """A request the spec rejects; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def match(method: str, path: str) -> tuple[Operation, str | None]:
    """The operation for ``method path`` and its path parameter, or SpecError (404/405)."""
    known_path = False
    for op in operations():
        m = op.pattern.match(path)
        if m is None:
            continue
        known_path = True
        if op.method == method:
            return op, (m.group(op.path_param) if op.path_param else None)
    if known_path:
        raise SpecError(405, f"Invalid request method {method} for {path}")
    raise SpecError(400, f"Invalid request URI: {path}")


def validate(op: Operation, path_value: str | None, body: Any) -> None:
    """Raise SpecError(400) when ``body`` does not fit the operation's schema."""
    if op.body_schema is None:
        if body not in (None, {}):
            raise SpecError(400, f"{op.method} {op.template} takes no body")
        return
    if body is None:
        raise SpecError(400, f"{op.method} {op.template} needs a JSON body")
    validator = jsonschema.Draft4Validator(op.body_schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(body))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "body"
        raise SpecError(400, f"Invalid body of {op.method} {op.template}: {where}: {error.message}")
    if op.path_param and isinstance(body, dict):
        id_field = "id" if op.path_param == "id" else op.path_param
        if id_field in body and body[id_field] != path_value:
            raise SpecError(400, "The id from the path does not match the id from the body!")
