"""Reading YAML (configs, experiment tables) within limits, with messages a student can act on.

PyYAML's ``safe_load`` builds no objects beyond plain data, but it still trusts the size of what it
is given: a few hundred bytes of nested aliases (``&a [*b, *b, ...]``, the "billion laughs") expand
into billions of values as soon as anything walks, copies or prints the result, a file can be any
size, and a document can nest deeper than Python can recurse. ``load_yaml_text`` refuses all of
that before building anything, with the file and line. It also explains the commonest YAML mistake
of a Windows user: a path in double quotes, where ``\\D`` is an unknown escape and ``\\n`` or ``\\t``
silently become a newline or a tab.
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from svlab.errors import ConfigError, YamlSyntaxError
from svlab.text import excerpt, printable

MAX_YAML_BYTES = 1_000_000    # a config is a few kilobytes
MAX_YAML_ALIASES = 100        # ``*name`` references in one document
MAX_YAML_VALUES = 100_000     # values (keys, items, scalars) once every alias is expanded

ESCAPE_HINT = ("inside double quotes YAML reads a backslash as the start of an escape (\\n, \\t, \\x41, ...), "
               "so write a Windows path in single quotes or without quotes")


class _Refused(Exception):
    """A limit of this module was exceeded at ``mark`` (a PyYAML mark, or None)."""

    def __init__(self, what: str, mark=None):
        super().__init__(what)
        self.mark = mark


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, counting alias references while it composes the document."""

    def __init__(self, stream):
        super().__init__(stream)
        self.aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_YAML_ALIASES:
                raise _Refused(f"more than {MAX_YAML_ALIASES} alias references (*name); a configuration needs "
                               "few or none: write the values out", self.peek_event().start_mark)
        return super().compose_node(parent, index)


def _children(node) -> list:
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, SequenceNode):
        return list(node.value)
    return []


def _expanded_size(root, limit: int) -> int:
    """Number of values in the document once every alias is expanded (capped at ``limit + 1``);
    ``_Refused`` for a document that contains itself. Shared nodes are counted once per use without
    being walked again, so this costs as much as the document's text, not its expansion."""
    size: dict[int, int] = {}
    state: dict[int, int] = {}          # 1: on the current path, 2: done
    stack = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            size[key] = min(limit + 1, 1 + sum(size[id(c)] for c in _children(node)))
            state[key] = 2
            continue
        if state.get(key) == 2:
            continue
        if state.get(key) == 1:
            raise _Refused("an alias refers to a value that contains it (a document of infinite size)",
                           node.start_mark)
        state[key] = 1
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if state.get(id(c)) != 2)
    return size[id(root)]


def _single_quoted(line: str) -> str | None:
    """``root: "F:\\Data"`` -> ``root: 'F:\\Data'`` (the first double-quoted value holding a backslash)."""
    m = re.search(r'"([^"]*\\[^"]*)"', line)
    if not m:
        return None
    inner = m.group(1)
    value = f"'{inner}'" if "'" not in inner else inner
    return (line[:m.start()] + value + line[m.end():]).strip()


_CONTROL_NAMES = {"\n": "a line break (\\n)", "\t": "a tab (\\t)", "\r": "a carriage return (\\r)",
                  "\a": "a bell character (\\a)", "\b": "a backspace (\\b)", "\x1b": "an escape character (\\e)",
                  "\0": "a null character (\\0)"}


def _escape_problems(root, text: str) -> tuple[str, int] | None:
    """A double-quoted value whose escapes made control characters (``"F:\\new"`` holds a newline):
    ``(message, line index)``, else None."""
    stack = [root]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, ScalarNode):
            if node.style == '"' and not node.value.isprintable():
                raw = text[node.start_mark.index:node.end_mark.index]
                if "\\" in raw:
                    line = text.splitlines()[node.start_mark.line] if text else ""
                    fixed = _single_quoted(line)
                    bad = next(c for c in node.value if not c.isprintable())
                    name = _CONTROL_NAMES.get(bad, f"the control character U+{ord(bad):04X}")
                    return (f"{excerpt(raw)} holds {name} where a backslash was meant: {ESCAPE_HINT}"
                            + (f": {excerpt(fixed, 120)}" if fixed else ""), node.start_mark.line)
        stack.extend(_children(node))
    return None


def load_yaml_text(text: str, source: str, check_escapes: bool = False):
    """The data of one YAML document (None for an empty one) read with PyYAML's safe loader, or a
    one-line ``ConfigError`` starting ``source:line``: invalid YAML, more than ``MAX_YAML_ALIASES``
    alias references or ``MAX_YAML_VALUES`` values after expanding them, a self-containing alias,
    nesting too deep, numbers too long. ``check_escapes``: also refuse double-quoted values whose
    backslash escapes produced control characters (paths in a config)."""
    def fail(what: str, line: int | None = None, kind=ConfigError):
        where = f":{line + 1}" if line is not None else ""
        return kind(f"{source}{where}: {what}")

    if len(text) > MAX_YAML_BYTES:
        raise fail(f"{len(text)} characters is too long for a YAML settings file (at most {MAX_YAML_BYTES})")
    loader = None
    try:
        loader = _BoundedLoader(text)  # refuses control characters in the text already
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, MAX_YAML_VALUES) > MAX_YAML_VALUES:
            raise _Refused(f"expands to more than {MAX_YAML_VALUES} values through its aliases (*name); "
                           "write the values out", None)
        if check_escapes:
            problem = _escape_problems(node, text)
            if problem:
                raise fail(*problem)
        return loader.construct_document(node)
    except _Refused as e:
        raise fail(str(e), e.mark.line if e.mark is not None else None) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line if mark is not None else None
        problem = " ".join(printable(getattr(e, "problem", None) or e).split())
        if "escape" in problem and "double-quoted" in str(getattr(e, "context", "")):
            fixed = _single_quoted(text.splitlines()[line]) if line is not None and text else None
            raise fail(f"not valid YAML ({problem}): {ESCAPE_HINT}" + (f": {excerpt(fixed, 120)}" if fixed else ""),
                       line, YamlSyntaxError) from None
        raise fail(f"not valid YAML ({excerpt(problem, 160)})", line, YamlSyntaxError) from None
    except ConfigError:
        raise
    except RecursionError:
        raise fail("nested too deeply to read (lists or sections inside each other hundreds of times)") from None
    except (ValueError, OverflowError) as e:  # e.g. an integer of more than 4300 digits
        raise fail("a number has too many digits" if "digits" in str(e)
                   else f"a value cannot be read ({excerpt(str(e), 120)})") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml_file(path: Path, what: str = "config file", flag: str = "--config", check_escapes: bool = False):
    """``load_yaml_text`` of a file, refusing in one line a missing file, a folder, an unreadable or
    oversized file and text that is not UTF-8 (``what``/``flag`` name it in the messages)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder; pass a YAML file to {flag}")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path} (pass an existing file to {flag})") from None
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be read ({printable(e.strerror or e)})") from None
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: more than {MAX_YAML_BYTES} bytes is too long for a YAML settings file; "
                          f"is it the right file?")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    return load_yaml_text(text, str(path), check_escapes=check_escapes)
