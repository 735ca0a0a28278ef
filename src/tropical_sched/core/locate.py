"""Find the line of a value inside a JSON or YAML document, for error messages that name path and line."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["LocatedValueError", "line_of", "validation_message"]


class LocatedValueError(ValueError):
    """A model validator's error about one field below the model (say ``instances[1].url`` of a config whose
    instances repeat an engine), so that :func:`validation_message` names that field, its value and its line
    rather than the whole model.

    Its text names the field too (``instances[1].url = '...': <message>``), for a model built in code rather than
    read from a file.

    Args:
        loc: the field's location below the validated model (keys and list indices).
        value: the field's value.
        message: what is wrong with it.
    """

    def __init__(self, loc: Sequence[int | str], value: object, message: str) -> None:
        self.loc = tuple(loc)
        self.value = value
        self.message = message
        super().__init__(f"{_field_name(self.loc)} = {value!r}: {message}")


def _field_name(loc: Sequence[int | str]) -> str:
    """``a.b[2].c`` for ``("a", "b", 2, "c")``."""
    return ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in loc).replace(".[", "[")


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
    value = first.get("input")
    # pydantic prefixes the text of a validator's ValueError with "Value error, ": noise in a one-line message
    message = str(first["msg"]).removeprefix("Value error, ")
    ctx = first.get("ctx")
    error = ctx.get("error") if isinstance(ctx, dict) else None
    if isinstance(error, LocatedValueError):
        loc = [*loc, *error.loc]
        value = error.value
        message = error.message
    field = _field_name(loc)
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    more = f" (and {error_count - 1} more errors)" if error_count > 1 else ""
    return loc, f"field {field or '<root>'} = {shown}: {message}{more}"
