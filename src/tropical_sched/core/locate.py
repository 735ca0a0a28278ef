"""Find the line of a value inside a JSON or YAML document, for error messages that name path and line."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["line_of", "validation_message"]


def line_of(text: str, loc: Sequence[int | str]) -> int | None:
    """1-based line where the value at ``loc`` (keys and list indices) starts, or the deepest line found.

    Uses YAML's position-keeping composer, which also reads JSON. Returns ``None`` if the text does not parse.
    """
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    line = None
    for key in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode) and isinstance(key, str):
            node = next((v for k, v in node.value if getattr(k, "value", None) == key), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            break
    if node is not None:
        line = node.start_mark.line + 1
    return line


def validation_message(errors: list[dict[str, object]], error_count: int) -> tuple[list[int | str], str]:
    """The location and one-line message of the first pydantic validation error.

    Returns:
        ``(loc, "field a.b[2].c = <value>: <what is wrong> (and N more errors)")``.
    """
    first = errors[0]
    raw_loc = first["loc"]
    loc = [part for part in raw_loc if isinstance(part, (str, int))]  # type: ignore[attr-defined]
    field = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in loc).replace(".[", "[")
    value = first.get("input")
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    more = f" (and {error_count - 1} more errors)" if error_count > 1 else ""
    return loc, f"field {field or '<root>'} = {shown}: {first['msg']}{more}"
