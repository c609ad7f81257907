"""Configuration: load ``config.yaml``, apply command-line overrides, validate, resolve paths.

The shipped ``config.yaml`` in the project folder is the schema: every key a user config may have,
with the type of its default value. A user config (``--config my.yaml``) only needs the keys it
changes; everything else comes from the shipped file. Unknown keys and wrong types stop the program
before any work starts, with the key, the config file and a suggestion.
"""
from __future__ import annotations

import copy
import difflib
import ntpath
import os
import re
from pathlib import Path, PurePosixPath

import yaml

from svlab.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # the project folder: config.yaml, files/, saved_model/
DEFAULT_CONFIG = PROJECT_ROOT / "config.yaml"
FILES_DIR = PROJECT_ROOT / "files"  # the lab's manifests: split_train_set.txt, test_set.txt, trials.txt




_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


def normalize_relpath(path: str) -> str:
    """Manifest-style relative path with forward slashes: ``a\\b\\c.wav`` -> ``a/b/c.wav``.

    Manifests and trial lists written on Windows use backslashes; the same utterance must get the same
    key whichever separator the file used.
    """
    path = path.strip().replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    return str(PurePosixPath(path)) if path else path


def resolve_path(path: str | os.PathLike, base: Path = PROJECT_ROOT) -> Path:
    """Absolute path for a config or manifest path written with either separator.

    Relative paths resolve against ``base`` (the project folder for config values). A Windows drive
    path such as ``F:\\DataSet\\Aishell\\ALL`` stays a drive path; on Linux it simply does not exist,
    and the caller reports that with the key that named it.
    """
    text = str(path).strip()
    if not text:
        raise ConfigError("empty path")
    if _WINDOWS_DRIVE.match(text) or text.startswith("\\\\"):
        if os.name == "nt":
            return Path(ntpath.normpath(text))
        return Path(text.replace("\\", "/"))
    text = text.replace("\\", "/") if os.name != "nt" else text
    p = Path(os.path.expanduser(text))
    return p if p.is_absolute() else (base / p)


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 0.001}}`` -> ``{"train.lr": 0.001}`` (nested sections to dotted keys)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path} (pass an existing file to --config)") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data:, test:, ...) at the top level")
    return data


def _check_value(key: str, value, default, source: str):
    """Coerce ``value`` to the type of ``default`` or raise a ConfigError naming key and source."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif isinstance(default, str):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value) if not isinstance(value, str) else value
    elif isinstance(default, list):
        if isinstance(value, list):
            return value
    hint = ("; YAML reads unquoted yes/no/on/off/true/false as a boolean: quote the word"
            if isinstance(default, str) and isinstance(value, bool) else "")
    raise ConfigError(
        f"{source}: key '{key}' must be {type(default).__name__} (like the default {default!r}), got {value!r}{hint}"
    )


def _merge(base: dict, update: dict, schema_flat: dict, source: str, prefix: str = "",
           sources: dict | None = None) -> None:
    for k, v in update.items():
        key = f"{prefix}{k}"
        if key not in schema_flat and not any(s.startswith(key + ".") for s in schema_flat):
            close = difflib.get_close_matches(key, list(schema_flat), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known sections: {sorted(base)}"
            raise ConfigError(f"{source}: unknown key '{key}'{hint}")
        if isinstance(v, dict):
            if not isinstance(base.get(k), dict):
                raise ConfigError(f"{source}: key '{key}' is a value, not a section")
            _merge(base[k], v, schema_flat, source, key + ".", sources)
        else:
            if isinstance(base.get(k), dict):
                raise ConfigError(f"{source}: key '{key}' is a section; give its keys (e.g. {key}.{next(iter(base[k]))})")
            base[k] = _check_value(key, v, schema_flat[key], source)
            if sources is not None:
                sources[key] = source


def parse_override(text: str) -> tuple[str, object]:
    """``train.lr=0.002`` -> ("train.lr", 0.002); values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.lr=0.002")
    key, raw = text.split("=", 1)
    if re.fullmatch(r"\s*[+-]?0\d+\s*", raw):  # run folders like 001: YAML would read an int (or octal)
        return key.strip(), raw.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | os.PathLike | None = None, overrides: dict | None = None) -> dict:
    """Return the full configuration: shipped defaults <- ``path`` <- ``overrides``.

    ``overrides`` maps dotted keys (``"train.lr"``) to values; ``None`` values are ignored so that
    unset argparse flags can be passed straight through. The result also has ``_config_path`` (the
    user config file, else the shipped one) and ``_sources`` (``{dotted key: where it was set}`` for
    every key the user config or an override set; see ``key_source`` and ``explicit_keys``).
    """
    cfg = _read_yaml(DEFAULT_CONFIG)
    schema_flat = flatten(cfg)
    source = str(DEFAULT_CONFIG)
    sources: dict[str, str] = {}
    if path is not None:
        user_path = Path(path)
        if not user_path.is_absolute():
            user_path = Path.cwd() / user_path
        source = str(user_path)
        _merge(cfg, _read_yaml(user_path), schema_flat, source, sources=sources)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        nested: dict = {}
        cur = nested
        parts = key.split(".")
        for part in parts[:-1]:
            cur = cur.setdefault(part, {})
        cur[parts[-1]] = value
        _merge(cfg, nested, schema_flat, f"command line (--set {key}=...)", sources=sources)
    cfg["_config_path"] = source
    cfg["_sources"] = sources
    validate(cfg)
    return cfg


def key_source(cfg: dict, dotted: str) -> str:
    """Where the value of ``dotted`` came from: the user config file, the command line, or the
    shipped ``config.yaml`` (for error messages that must say which file to fix)."""
    return cfg.get("_sources", {}).get(dotted, str(DEFAULT_CONFIG))


def explicit_keys(cfg: dict) -> set[str]:
    """Dotted keys the user set (in ``--config`` or as overrides), as opposed to shipped defaults."""
    return set(cfg.get("_sources", {}))


XVECTOR_CONTEXT = 14  # frames the x-vector's frame layers consume (xvector.CONTEXT; checked by the tests)

# The one list of every named choice; argparse flags, experiment tables and the model factory take theirs
# from here, and ``validate`` refuses anything else with the key and the file.
CHOICES = {
    "model.name": ("xvector", "ecapa"),
    "model.pooling": ("gap", "stats", "asp"),
    "loss.type": ("softmax", "amsoftmax", "aamsoftmax"),
    "train.scheduler": ("cosine", "step", "none"),
    "train.amp": ("auto", "fp32", "bf16", "fp16"),
    "data.bad_audio": ("error", "skip"),
    "test.backend": ("cosine", "plda"),
    "test.score_norm": ("none", "asnorm"),
}
NOISE_TYPES = ("white", "pink", "babble")  # what augment.noise_types may list (svlab/augment.py makes them)


def get_key(cfg: dict, dotted: str):
    cur = cfg
    for part in dotted.split("."):
        cur = cur[part]
    return cur


def validate(cfg: dict) -> None:
    """Value checks that types alone cannot express; messages name the key and where it was set."""
    def src(key: str) -> str:
        return key_source(cfg, key)
    for key, choices in CHOICES.items():
        value = get_key(cfg, key)
        if value not in choices:
            raise ConfigError(f"{src(key)}: key '{key}' is {value!r}; choose one of {', '.join(choices)}")
    positive = ["features.sample_rate", "features.n_mfcc", "features.n_mels", "train.epochs",
                "train.batchsize", "train.crop_frames", "model.embedding_size", "model.channels",
                "model.stat_channels", "test.batch_size", "train.lr"]
    for key in positive:
        if get_key(cfg, key) <= 0:
            raise ConfigError(f"{src(key)}: key '{key}' must be positive, got {get_key(cfg, key)!r}")
    if cfg["features"]["n_mfcc"] > cfg["features"]["n_mels"]:
        raise ConfigError(f"{src('features.n_mfcc')}: features.n_mfcc ({cfg['features']['n_mfcc']}) cannot exceed "
                          f"features.n_mels ({cfg['features']['n_mels']}); raise n_mels")
    for key in ("features.min_seconds", "train.warmup_epochs", "loss.margin_warmup_epochs",
                "train.keep_checkpoints", "train.num_workers"):
        if get_key(cfg, key) < 0:
            raise ConfigError(f"{src(key)}: key '{key}' must be 0 or more, got {get_key(cfg, key)!r}")
    if cfg["model"]["name"] == "xvector" and cfg["train"]["crop_frames"] <= XVECTOR_CONTEXT:
        key = "train.crop_frames"
        raise ConfigError(f"{src(key)}: key '{key}' is {cfg['train']['crop_frames']}, but the x-vector "
                          f"consumes {XVECTOR_CONTEXT} frames of context; use more than {XVECTOR_CONTEXT} (100 = 1 s)")
    if "augment" in cfg:
        _validate_augment(cfg)


def _validate_augment(cfg: dict) -> None:
    """Checks of the ``augment:`` section (probabilities, ranges, noise types, speed factors)."""
    aug = cfg["augment"]

    def fail(key: str, what: str) -> None:
        dotted = f"augment.{key}"
        raise ConfigError(f"{key_source(cfg, dotted)}: key '{dotted}' {what}, got {aug[key]!r}")

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    for key in ("copies", "time_masks", "max_time", "freq_masks", "max_freq"):
        if aug[key] < 0:
            fail(key, "must be 0 or more")
    for key in ("noise_prob", "reverb_prob", "gain_prob", "speed_prob"):
        if not 0.0 <= aug[key] <= 1.0:
            fail(key, "is a probability and must be between 0 and 1")
    for key in ("snr_db", "rt60", "gain_db"):
        v = aug[key]
        if len(v) != 2 or not all(number(x) for x in v) or v[0] > v[1]:
            fail(key, "must be a range [low, high] of two numbers with low <= high")
    if aug["rt60"][0] <= 0:
        fail("rt60", "must be positive (seconds)")
    bad = [t for t in aug["noise_types"] if t not in NOISE_TYPES]
    if bad:
        fail("noise_types", f"may only list {', '.join(NOISE_TYPES)} ({bad} unknown)")
    if not all(number(f) and 0.5 <= f <= 2.0 for f in aug["speed_factors"]):
        fail("speed_factors", "must be a list of speed factors between 0.5 and 2 (e.g. [0.9, 1.1])")
    if (aug["speed_prob"] > 0 or aug["speed_as_new_speakers"]) and not aug["speed_factors"]:
        fail("speed_factors", "must not be empty when speed perturbation is on")


def config_path_value(cfg: dict, dotted: str) -> Path:
    """Resolve a path-valued config key (relative to the project folder)."""
    value = get_key(cfg, dotted)
    try:
        return resolve_path(value)
    except ConfigError:
        raise ConfigError(f"{key_source(cfg, dotted)}: key '{dotted}' is empty; set it to a path") from None


def public_config(cfg: dict) -> dict:
    """Copy without private entries (``_config_path``), e.g. to store inside a checkpoint."""
    return {k: copy.deepcopy(v) for k, v in cfg.items() if not k.startswith("_")}
