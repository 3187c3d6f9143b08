"""Where each value of a policy YAML file is: 1-based line and column by dotted place.

The loader reports problems by place (``tenants.acme.sla_class``, the section, the name and the
field joined by dots, list items by index). ``node_marks`` composes the YAML (no construction, so
it works on any file the parser accepts) and maps every such place to the position of its value
when that is a scalar, else of its key: a wrong value points at the value, a bad entry at its name.
``locate`` finds a place or its nearest enclosing one (a missing field points at its mapping).
"""

from __future__ import annotations

from collections.abc import Iterator

import yaml

Position = tuple[int, int]
KEY_SUFFIX = "\0key"  # marks[place + KEY_SUFFIX]: where the key itself starts (an unknown field's name)


def _mark(mark: yaml.Mark) -> Position:
    return mark.line + 1, mark.column + 1


def node_marks(data: bytes | str) -> dict[str, Position]:
    """Dotted place -> (line, column); empty when the text is not YAML the parser accepts."""
    try:
        root = yaml.compose(data, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    marks: dict[str, Position] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
                place = f"{prefix}.{key}" if prefix else key
                scalar = isinstance(value_node, yaml.ScalarNode)
                marks.setdefault(place, _mark(value_node.start_mark if scalar else key_node.start_mark))
                marks.setdefault(place + KEY_SUFFIX, _mark(key_node.start_mark))
                walk(value_node, place)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                place = f"{prefix}.{index}"
                marks.setdefault(place, _mark(item.start_mark))
                walk(item, place)

    if root is not None:
        walk(root, "")
    return marks


def locate(marks: dict[str, Position], place: str, *, key: bool = False) -> Position | None:
    """The position of ``place`` (of its key when ``key``), else of the nearest enclosing place
    found, else None."""
    if key and place + KEY_SUFFIX in marks:
        return marks[place + KEY_SUFFIX]
    while place:
        if place in marks:
            return marks[place]
        cut = place.rfind(".")
        if cut < 0:
            return None
        place = place[:cut]
    return None


def _mapping_keys(data: bytes | str) -> Iterator[tuple[str, yaml.Node]]:
    """Every mapping key of the document with its dotted place (keys of one mapping in document
    order); nothing when the text is not YAML."""
    try:
        root = yaml.compose(data, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return
    todo: list[tuple[yaml.Node, str]] = [(root, "")] if root is not None else []
    while todo:
        node, prefix = todo.pop()
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                place = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
                yield place, key_node
                todo.append((value_node, place))
        elif isinstance(node, yaml.SequenceNode):
            todo.extend((item, f"{prefix}.{i}") for i, item in enumerate(node.value))


def key_place(data: bytes | str, line: int, column: int) -> str | None:
    """The dotted place of the mapping key that starts at ``line``/``column`` (1-based), if any."""
    return next((place for place, key in _mapping_keys(data) if _mark(key.start_mark) == (line, column)), None)


def first_key(data: bytes | str, place: str) -> Position | None:
    """Where the first of several equal keys at ``place`` starts (a duplicate's first definition)."""
    return next((_mark(key.start_mark) for found, key in _mapping_keys(data) if found == place), None)
