"""Pointing a config at prepared manifests: the five data keys, and editing a YAML config in place.

``write_config`` changes only those keys, line by line, so the shipped ``config.yaml`` keeps its comments,
order, line endings and byte-order mark; it refuses (``PrepareError``) whatever it cannot edit safely.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from svlab.config import DEFAULT_CONFIG, PROJECT_ROOT, flatten
from svlab.corpora import TEST_NAME, TRAIN_NAME, TRIALS_NAME
from svlab.errors import ConfigError, PrepareError, YamlSyntaxError
from svlab.files import atomic_write, shown
from svlab.text import excerpt
from svlab.yaml_files import load_yaml_text

MAX_CONFIG_BYTES = 1 << 20          # a config file is a few kB; anything this large is something else
CONFIG_KEYS = ("data.root", "data.train_manifest", "test.root", "test.test_manifest", "test.trials")


def _config_value(path: Path) -> str:
    """How a path is written in config.yaml: relative to the project folder when inside it."""
    path = Path(os.path.abspath(path))
    try:
        return path.relative_to(PROJECT_ROOT).as_posix() or "."
    except ValueError:
        return str(path)


def config_values(root: Path, out: Path) -> dict[str, str]:
    """The ``CONFIG_KEYS`` for a corpus at ``root`` whose three manifests are in ``out``."""
    out = Path(out)
    return {
        "data.root": _config_value(root),
        "data.train_manifest": _config_value(out / TRAIN_NAME),
        "test.root": _config_value(root),
        "test.test_manifest": _config_value(out / TEST_NAME),
        "test.trials": _config_value(out / TRIALS_NAME),
    }


def _yaml_scalar(value: str) -> str:
    """``value`` as a YAML string scalar: plain when that reads back the same, else single-quoted."""
    try:
        plain_ok = (value == value.strip() and "#" not in value
                    and yaml.safe_load(f"k: {value}") == {"k": value})
    except yaml.YAMLError:
        plain_ok = False
    return value if plain_ok else "'" + value.replace("'", "''") + "'"


def config_snippet(values: dict[str, str]) -> str:
    """``values`` (dotted keys) as the YAML lines to paste into a config."""
    lines, section = [], None
    for key, value in values.items():
        sec, name = key.split(".", 1)
        if sec != section:
            lines.append(f"{sec}:")
            section = sec
        lines.append(f"  {name}: {_yaml_scalar(value)}")
    return "\n".join(lines)


_SECTION = re.compile(r"^(?P<key>[A-Za-z_][\w-]*)\s*:\s*(#.*)?$")
_KEY = re.compile(r"^(?P<indent>[ \t]+)(?P<key>[A-Za-z_][\w-]*)(?P<colon>\s*:)(?P<rest>(\s.*)?)$")


def _split_comment(rest: str) -> tuple[str, str]:
    """``' value   # note'`` -> (``' value   '``, ``'# note'``), minding quoted values."""
    stripped = rest.lstrip()
    start = len(rest) - len(stripped)
    i = start
    if stripped[:1] in ("'", '"'):
        quote, i = stripped[0], start + 1
        while i < len(rest):
            if rest[i] == quote:
                if quote == "'" and rest[i + 1:i + 2] == "'":
                    i += 2
                    continue
                break
            i += 2 if (quote == '"' and rest[i] == "\\") else 1
    for k in range(i, len(rest)):
        if rest[k] == "#" and (k == 0 or rest[k - 1] in " \t"):
            return rest[:k], rest[k:]
    return rest, ""


def edit_config_text(text: str, values: dict[str, str]) -> str:
    """Set the dotted ``values`` in YAML ``text`` line by line; comments, order and other keys stay.

    Raises PrepareError when the file's shape does not allow a safe line edit (flow style, block
    scalars) or when the result would change anything but the requested keys.
    """
    lines = text.splitlines(keepends=True)
    wanted = {tuple(k.split(".", 1)): v for k, v in values.items()}
    done: set[tuple[str, str]] = set()
    section, child_indent = None, None
    last_line_of: dict[str, int] = {}
    out = list(lines)
    for n, line in enumerate(lines):
        body = line.rstrip("\r\n")
        eol = line[len(body):]
        if not body.strip() or body.lstrip().startswith("#"):
            continue
        if not body[0].isspace():
            m = _SECTION.match(body)
            section, child_indent = (m.group("key"), None) if m else (None, None)
            if section:
                last_line_of[section] = n
            continue
        if section is None:
            continue
        last_line_of[section] = n
        m = _KEY.match(body)
        if not m:
            continue
        if child_indent is None:
            child_indent = m.group("indent")
        if m.group("indent") != child_indent or (section, m.group("key")) not in wanted:
            continue
        value_part, comment = _split_comment(m.group("rest"))
        if not value_part.strip() or value_part.strip()[0] in "|>&*!{[":
            raise PrepareError(f"cannot edit '{section}.{m.group('key')}' line by line (line {n + 1}); set it by hand")
        new_value = " " + _yaml_scalar(wanted[(section, m.group("key"))])
        if comment:
            new_value = new_value.ljust(len(value_part)) if len(new_value) + 2 <= len(value_part) else new_value + "  "
        out[n] = f"{m.group('indent')}{m.group('key')}{m.group('colon')}{new_value}{comment}{eol}"
        done.add((section, m.group("key")))
    newline = "\r\n" if "\r\n" in text else "\n"
    inserts: dict[int, list[str]] = {}
    new_sections: dict[str, list[str]] = {}
    for (sec, key), value in wanted.items():
        if (sec, key) in done:
            continue
        if sec in last_line_of:
            entry = f"{_child_indent(lines, sec) or '  '}{key}: {_yaml_scalar(value)}{newline}"
            inserts.setdefault(last_line_of[sec], []).append(entry)
        else:
            new_sections.setdefault(sec, []).append(f"  {key}: {_yaml_scalar(value)}{newline}")
    result = []
    for n, line in enumerate(out):
        if n in inserts and not line.endswith(("\n", "\r")):
            line += newline
        result.append(line)
        result.extend(inserts.get(n, []))
    for sec, entries in new_sections.items():
        if result and not result[-1].endswith(("\n", "\r")):
            result[-1] += newline
        result += [newline, f"{sec}:{newline}", *entries]
    new_text = "".join(result)
    _verify_edit(text, new_text, values)
    return new_text


def _child_indent(lines: list[str], section: str) -> str | None:
    inside = False
    for line in lines:
        body = line.rstrip("\r\n")
        if not body.strip() or body.lstrip().startswith("#"):
            continue
        if not body[0].isspace():
            m = _SECTION.match(body)
            inside = bool(m and m.group("key") == section)
            continue
        if inside:
            return body[:len(body) - len(body.lstrip())]
    return None


def _verify_edit(old_text: str, new_text: str, values: dict[str, str]) -> None:
    try:
        old_data, new_data = load_yaml_text(old_text, "the config") or {}, load_yaml_text(new_text, "the config") or {}
    except YamlSyntaxError as e:
        problem = excerpt(" ".join(str(e).split()), 160)
        raise PrepareError(f"the config is not valid YAML or would not stay valid ({problem}); "
                           "set the keys by hand") from None
    if not isinstance(old_data, dict) or not isinstance(new_data, dict):
        raise PrepareError("the config is not a mapping of sections (data:, test:, ...); set the keys by hand")
    old, new = flatten(old_data), flatten(new_data)
    expected = {**old, **values}
    if new != expected:
        bad = sorted(k for k in set(new) | set(expected) if new.get(k) != expected.get(k))
        raise PrepareError(f"a line edit of the config would change {', '.join(bad)} unexpectedly; "
                           "set the keys by hand (file left unchanged)")


def _config_sections() -> set[str]:
    try:
        shipped = load_yaml_text(DEFAULT_CONFIG.read_text(encoding="utf-8-sig"), str(DEFAULT_CONFIG))
    except (OSError, ConfigError):
        shipped = None
    return set(shipped) if isinstance(shipped, dict) else {"data", "test", "features", "model", "loss", "train",
                                                           "augment"}


def _refuse_other_files(path: Path, text: str) -> None:
    """An existing file that is not a config (a manifest, some other YAML or JSON file) is never edited."""
    try:
        data = load_yaml_text(text, shown(path))  # within svlab.yaml_files' limits (aliases, size)
    except YamlSyntaxError:
        return                      # edit_config_text says what is wrong with it
    if data is None:
        return
    if not isinstance(data, dict):
        raise PrepareError(f"--write_config {shown(path)} is not a config file (not a mapping of sections "
                           "data:, test:, ...); name a config file, or a new file to create")
    other = sorted(str(k) for k in data if k not in _config_sections())
    if other:
        raise PrepareError(f"--write_config {shown(path)} is not a config file (it holds "
                           f"{', '.join(shown(k) for k in other[:5])}{' ...' if len(other) > 5 else ''}, which "
                           "are not config sections); name a config file, or a new file to create")


def _existing_config(path: str | os.PathLike) -> tuple[Path, str | None, bool]:
    """``(file to edit, its text or None when new, byte-order mark)``; a symbolic link is followed."""
    path = Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)
    if not path.exists():
        return path, None, False
    if not path.is_file():
        raise PrepareError(f"--write_config {shown(path)} is not a file; name a config file")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise PrepareError(f"--write_config {shown(path)} is not a config file ({path.stat().st_size} bytes); "
                           "name a config file, or a new file to create")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise PrepareError(f"{shown(path)} is not UTF-8 text; set the keys by hand") from None
    _refuse_other_files(path, text)
    return path, text, raw.startswith(b"\xef\xbb\xbf")


def check_config_target(path: str | os.PathLike) -> None:
    """Refuse, before any work, a ``--write_config`` file that ``write_config`` would refuse."""
    _path, text, _bom = _existing_config(path)
    if text is not None:
        edit_config_text(text, {key: "placeholder" for key in CONFIG_KEYS})


def write_config(path: str | os.PathLike, values: dict[str, str]) -> Path:
    """Set ``values`` (dotted keys) in the YAML config at ``path``, keeping comments; atomic.

    A missing file is created as a small user config (``python train.py --config PATH``). A symbolic
    link is followed (the file it names is edited, the link stays); an existing file that is not a
    config (its top-level keys are not config sections) is refused.
    """
    path, text, bom = _existing_config(path)
    if text is not None:
        new_text = edit_config_text(text, values)
        data = (b"\xef\xbb\xbf" if bom else b"") + new_text.encode("utf-8")
    else:
        new_text = ("# Data paths written by tools/prepare_data.py; use with: python train.py --config "
                    f"{path.name}\n" + config_snippet(values) + "\n")
        _verify_edit("", new_text, values)
        data = new_text.encode("utf-8")
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return path

