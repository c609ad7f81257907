"""Configuration: load ``config.yaml``, apply command-line overrides, validate, resolve paths.

The shipped ``config.yaml`` in the project folder is the schema: every key a user config may have,
with the type of its default value. A user config (``--config my.yaml``) only needs the keys it
changes; everything else comes from the shipped file. Unknown keys and wrong types stop the program
before any work starts, with the key, the config file and a suggestion.
"""
from __future__ import annotations

import copy
import difflib
import math
import ntpath
import os
import re
import sys
from pathlib import Path, PurePosixPath

from svlab.errors import ConfigError, YamlSyntaxError
from svlab.text import excerpt
from svlab.yaml_files import load_yaml_text, read_yaml_file

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # the project folder: config.yaml, files/, saved_model/
DEFAULT_CONFIG = PROJECT_ROOT / "config.yaml"
FILES_DIR = PROJECT_ROOT / "files"  # the lab's manifests: split_train_set.txt, test_set.txt, trials.txt




_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:([\\/]|$)")


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
    path such as ``F:\\DataSet\\Aishell\\ALL`` or a ``\\\\server\\share`` path stays one on Windows;
    elsewhere it raises ``ConfigError`` (``foreign_path_problem``) instead of becoming a folder named
    ``F:`` under the working directory. ``config_path_value`` adds the key and the file.
    """
    text = str(path).strip()
    if not text:
        raise ConfigError("empty path")
    if _WINDOWS_DRIVE.match(text) or text.startswith("\\\\"):
        if os.name == "nt":
            return Path(ntpath.normpath(text))
        raise ConfigError(foreign_path_problem(text))
    text = text.replace("\\", "/") if os.name != "nt" else text
    p = Path(os.path.expanduser(text))
    return p if p.is_absolute() else (base / p)


def is_foreign_path(path) -> bool:
    """True for a Windows drive or UNC path (``D:\\runs``, ``C:/x``, ``\\\\server\\share``) on a
    machine that is not Windows: such a path cannot name anything here."""
    text = str(path).strip()
    return os.name != "nt" and bool(_WINDOWS_DRIVE.match(text) or text.startswith("\\\\"))


def foreign_path_problem(text: str) -> str:
    """Why a Windows path cannot be used here, with the WSL spelling of a drive path as the example."""
    m = re.match(r"^([A-Za-z]):[\\/]?(.*)$", text.strip())
    wsl = f"/mnt/{m.group(1).lower()}/{m.group(2)}".replace("\\", "/") if m else ""
    example = f" (under WSL the drive is mounted: {excerpt(wsl)})" if m else " (mount the share and give the mount point)"
    system = "macOS" if sys.platform == "darwin" else "Linux" if sys.platform.startswith("linux") else os.name
    return (f"{excerpt(text)} is a Windows path, which this {system} machine cannot open; "
            f"give it as a path of this machine{example}")


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
    """A config file's sections; missing, a folder, not UTF-8, not YAML, oversized or alias-bombed
    files are one ``ConfigError`` each (``svlab.yaml_files``)."""
    data = read_yaml_file(path, check_escapes=True) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data:, test:, ...) at the top level")
    return data


def _check_value(key: str, value, default, source: str):
    """Coerce ``value`` to the type of ``default`` or raise a ConfigError naming key and source.

    A key with no value (``lr:`` or ``~``, null in YAML), a number that is not finite (``.nan``,
    ``1e999``) and a string holding control characters (``"F:\\new"`` in double quotes) are refused too.
    """
    if default is None:
        return value
    if value is None:
        raise ConfigError(f"{source}: key '{key}' has no value (YAML reads an empty value or ~ as null); give "
                          f"a {type(default).__name__} like the default {excerpt(repr(default))}, or delete the line")
    value = _coerce(key, value, default, source)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{source}: key '{key}' is {value}; give a finite number")
    if isinstance(value, str) and not value.isprintable():
        raise ConfigError(f"{source}: key '{key}' holds a control character ({excerpt(repr(value))}); inside "
                          "double quotes YAML reads a backslash as an escape (\\n, \\t): use single quotes or none")
    if isinstance(value, list) and any(isinstance(x, float) and not math.isfinite(x) for x in value):
        raise ConfigError(f"{source}: key '{key}' holds a number that is not finite ({excerpt(repr(value))})")
    return value


def _coerce(key: str, value, default, source: str):
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
        if isinstance(value, bool) and {"on", "off"} <= set(CHOICES.get(key, ())):
            return "on" if value else "off"  # YAML reads an unquoted on/off as a boolean
    elif isinstance(default, list):
        if isinstance(value, list):
            return value
    hint = ("; YAML reads unquoted yes/no/on/off/true/false as a boolean: quote the word"
            if isinstance(default, str) and isinstance(value, bool) else "")
    raise ConfigError(
        f"{source}: key '{key}' must be {type(default).__name__} (like the default {default!r}), "
        f"got {excerpt(repr(value))}{hint}"
    )


def _merge(base: dict, update: dict, schema_flat: dict, source: str, prefix: str = "",
           sources: dict | None = None) -> None:
    for k, v in update.items():
        key = f"{prefix}{k}"
        if key not in schema_flat and not any(s.startswith(key + ".") for s in schema_flat):
            close = difflib.get_close_matches(key, list(schema_flat), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known sections: {sorted(base)}"
            raise ConfigError(f"{source}: unknown key '{excerpt(key)}'{hint}")
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
        value = load_yaml_text(raw, f"--set {excerpt(key.strip())}") if raw.strip() else ""
    except YamlSyntaxError:
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
        if is_foreign_path(path):
            raise ConfigError(f"--config: {foreign_path_problem(str(path))}")
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
    "model.name": ("xvector", "ecapa", "resnet34", "campplus"),
    "features.type": ("mfcc", "fbank"),
    "features.store_check": ("content", "size"),
    "model.pooling": ("gap", "stats", "asp"),
    "loss.type": ("softmax", "amsoftmax", "aamsoftmax"),
    "train.scheduler": ("cosine", "step", "none"),
    "train.amp": ("auto", "fp32", "bf16", "fp16"),
    "data.bad_audio": ("error", "skip"),
    "test.backend": ("cosine", "plda"),
    "test.score_norm": ("none", "asnorm"),
    "validation.mode": ("auto", "on", "off"),
    "augment.mode": ("offline", "online"),
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
            raise ConfigError(f"{src(key)}: key '{key}' is {excerpt(repr(value))}; "
                              f"choose one of {', '.join(choices)}")
    positive = ["features.sample_rate", "features.n_mfcc", "features.n_mels", "features.n_fbank", "train.epochs",
                "train.batchsize", "train.crop_frames", "model.embedding_size", "model.channels",
                "model.stat_channels", "model.base_channels", "test.batch_size", "test.batch_frames", "train.lr",
                "features.store_shard_size"]
    for key in positive:
        if get_key(cfg, key) <= 0:
            raise ConfigError(f"{src(key)}: key '{key}' must be positive, got {get_key(cfg, key)!r}")
    if cfg["features"]["type"] == "mfcc" and cfg["features"]["n_mfcc"] > cfg["features"]["n_mels"]:
        raise ConfigError(f"{src('features.n_mfcc')}: features.n_mfcc ({cfg['features']['n_mfcc']}) cannot exceed "
                          f"features.n_mels ({cfg['features']['n_mels']}); raise n_mels")
    for key in ("features.min_seconds", "train.warmup_epochs", "loss.margin_warmup_epochs",
                "train.keep_checkpoints", "train.num_workers", "train.weight_decay"):
        if get_key(cfg, key) < 0:
            raise ConfigError(f"{src(key)}: key '{key}' must be 0 or more, got {get_key(cfg, key)!r}")
    if cfg["model"]["name"] == "xvector" and cfg["train"]["crop_frames"] <= XVECTOR_CONTEXT:
        key = "train.crop_frames"
        raise ConfigError(f"{src(key)}: key '{key}' is {cfg['train']['crop_frames']}, but the x-vector "
                          f"consumes {XVECTOR_CONTEXT} frames of context; use more than {XVECTOR_CONTEXT} (100 = 1 s)")
    if "augment" in cfg:
        _validate_augment(cfg)
    _validate_values(cfg)
    if "validation" in cfg:
        _validate_validation(cfg)
    _validate_paths(cfg)
    _validate_corpora(cfg)


def _validate_augment(cfg: dict) -> None:
    """Checks of the ``augment:`` section (probabilities, ranges, noise types, speed factors)."""
    aug = cfg["augment"]

    def fail(key: str, what: str) -> None:
        dotted = f"augment.{key}"
        raise ConfigError(f"{key_source(cfg, dotted)}: key '{dotted}' {what}, got {excerpt(repr(aug[key]))}")

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    for key in ("copies", "time_masks", "max_time", "freq_masks", "max_freq"):
        if aug[key] < 0:
            fail(key, "must be 0 or more")
    for key in ("noise_prob", "reverb_prob", "gain_prob", "speed_prob", "online_prob"):
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


# Ceilings: a value above one cannot fit in memory (a model, a crop, an STFT, a decoded file) or is a
# typo; ``validate`` refuses it before any work. ``features.max_seconds`` also caps what
# ``svlab.audio`` reads when no setting is given.
LIMITS = {
    "features.sample_rate": 384_000, "features.n_fft": 65_536, "features.n_mels": 1_024,
    "features.win_length_ms": 1_000, "features.hop_length_ms": 1_000, "features.max_seconds": 7_200,
    "train.crop_frames": 30_000, "train.batchsize": 65_536, "test.batch_size": 65_536,
    "test.batch_frames": 100_000_000,
    "model.embedding_size": 8_192, "model.channels": 8_192, "model.stat_channels": 16_384,
    "model.base_channels": 1_024, "features.n_fbank": 1_024,
    "augment.copies": 100, "validation.max_trials": 10_000_000, "test.bootstrap": 100_000,
}
MIN_BOOTSTRAP = 100  # test.bootstrap: 0 (off) or at least this many replicates (svlab/confidence.py)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def feature_problems(feat: dict, strict: bool = True) -> list[tuple[str, str]]:
    """``(key inside features:, what is wrong)`` for settings no MFCC can be made with: counts that are
    not positive whole numbers, a zero or negative window or hop (or one shorter than a sample), ``fmin``
    not below ``fmax``, values above ``LIMITS``. ``strict`` adds what ``svlab.features.mfcc`` would
    quietly adjust (a window longer than ``n_fft``, ``fmax`` above the Nyquist frequency): refused in a
    config, accepted from a checkpoint that was trained that way."""
    out: list[tuple[str, str]] = []
    if feat.get("type", "mfcc") not in CHOICES["features.type"]:
        out.append(("type", f"must be one of {', '.join(CHOICES['features.type'])}, "
                            f"got {excerpt(repr(feat.get('type')))}"))
    for k in ("sample_rate", "n_mfcc", "n_mels", "n_fft", *(("n_fbank",) if feat.get("type") == "fbank" else ())):
        v = feat.get(k)
        if not (isinstance(v, int) and not isinstance(v, bool)) or v <= 0:
            out.append((k, f"must be a positive whole number, got {excerpt(repr(v))}"))
    for k in ("win_length_ms", "hop_length_ms", "fmax"):
        if not (_number(feat.get(k)) and feat[k] > 0):
            out.append((k, f"must be a positive number, got {excerpt(repr(feat.get(k)))}"))
    for k, required in (("fmin", True), ("min_seconds", False), ("max_seconds", False)):
        v = feat.get(k)
        if (required or v is not None) and not (_number(v) and v >= (0 if k != "max_seconds" else 1e-9)):
            out.append((k, f"must be {'positive' if k == 'max_seconds' else '0 or more'}, got {excerpt(repr(v))}"))
    if out:
        return out
    for k in ("sample_rate", "n_fft", "n_mels", "n_fbank", "win_length_ms", "hop_length_ms", "max_seconds"):
        if feat.get(k) is not None and feat[k] > LIMITS[f"features.{k}"]:
            out.append((k, f"is {feat[k]}; at most {LIMITS[f'features.{k}']} is allowed (more does not fit in "
                           "memory or is a typo)"))
    sr, nyquist = feat["sample_rate"], feat["sample_rate"] / 2
    if feat["fmin"] >= feat["fmax"]:
        out.append(("fmin", f"({feat['fmin']} Hz) must be below features.fmax ({feat['fmax']} Hz)"))
    elif feat["fmin"] >= nyquist:
        out.append(("fmin", f"({feat['fmin']} Hz) must be below half the sample rate ({nyquist:g} Hz)"))
    elif strict and feat["fmax"] > nyquist:
        out.append(("fmax", f"({feat['fmax']} Hz) is above half of features.sample_rate ({sr} Hz), the highest "
                            f"frequency a recording at that rate holds; set it to {nyquist:g} or less"))
    win, hop = round(sr * feat["win_length_ms"] / 1000), round(sr * feat["hop_length_ms"] / 1000)
    for k, n in (("win_length_ms", win), ("hop_length_ms", hop)):
        if n < 1:
            out.append((k, f"({feat[k]} ms) is shorter than one sample at {sr} Hz"))
    if strict and win > feat["n_fft"]:
        fft = 1 << (win - 1).bit_length()
        out.append(("win_length_ms", f"({feat['win_length_ms']} ms = {win} samples at {sr} Hz) is longer than "
                                     f"features.n_fft ({feat['n_fft']}); raise n_fft to {fft} or shorten the window"))
    if feat.get("min_seconds") is not None and feat.get("max_seconds") is not None \
            and feat["min_seconds"] >= feat["max_seconds"]:
        out.append(("min_seconds", f"({feat['min_seconds']} s) must be below features.max_seconds "
                                   f"({feat['max_seconds']} s)"))
    return out


def _validate_values(cfg: dict) -> None:
    """Ranges beyond ``validate``'s first checks: the feature settings (``feature_problems``), ceilings
    (``LIMITS``), and each key that must be positive, 0 or more, a fraction, or not empty."""
    def fail(key: str, what: str, source: str | None = None) -> None:
        raise ConfigError(f"{source or key_source(cfg, key)}: key '{key}' {what}")
    related = {"fmax": ("sample_rate",), "fmin": ("fmax", "sample_rate"), "win_length_ms": ("n_fft", "sample_rate"),
               "hop_length_ms": ("sample_rate",), "min_seconds": ("max_seconds",)}
    for k, what in feature_problems(cfg["features"]):
        keys = [f"features.{x}" for x in (k, *related.get(k, ()))]
        given = [x for x in keys if x in explicit_keys(cfg)]  # name the file the user changed, not the shipped one
        fail(f"features.{k}", what, key_source(cfg, given[0]) if given else None)
    flat = flatten(cfg)
    for key, high in LIMITS.items():
        if key in flat and get_key(cfg, key) > high:
            fail(key, f"is {get_key(cfg, key)}; at most {high} is allowed (more does not fit in memory or is a typo)")
    for key in ("train.step_size", "train.gamma", "loss.scale", "test.asnorm_top_n", "test.calibration_trials"):
        if get_key(cfg, key) <= 0:
            fail(key, f"must be positive, got {get_key(cfg, key)!r}")
    for key in ("train.seed", "loss.margin", "test.plda_lda_dim", "test.backend_utts_per_speaker", "augment.seed"):
        if key in flat and get_key(cfg, key) < 0:
            fail(key, f"must be 0 or more, got {get_key(cfg, key)!r}")
    if cfg["train"]["gamma"] > 1:
        fail("train.gamma", f"is {cfg['train']['gamma']}; it multiplies the learning rate every train.step_size "
                            "epochs, so it must be between 0 and 1 (0.5 halves it)")
    if not 0 < cfg["test"]["calibration_fraction"] < 1:
        fail("test.calibration_fraction", f"is a share of the training speakers and must be between 0 and 1 "
                                          f"(exclusive), got {cfg['test']['calibration_fraction']!r}")
    if not str(cfg["train"]["n_folder"]).strip():
        fail("train.n_folder", "is empty; name the run folder, e.g. '001'")
    if cfg["test"]["bootstrap"] < 0 or 0 < cfg["test"]["bootstrap"] < MIN_BOOTSTRAP:
        fail("test.bootstrap", f"is {cfg['test']['bootstrap']!r}; give 0 (no confidence intervals) or at least "
                               f"{MIN_BOOTSTRAP} replicates (fewer cannot place the 2.5th percentile; 1000 is usual)")


def _validate_validation(cfg: dict) -> None:
    """Checks of the ``validation:`` section (``svlab/validation.py``)."""
    v = cfg["validation"]

    def fail(key: str, what: str) -> None:
        dotted = f"validation.{key}"
        raise ConfigError(f"{key_source(cfg, dotted)}: key '{dotted}' {what}, got {excerpt(repr(v[key]))}")
    if not 0 < v["fraction"] < 1:
        fail("fraction", "is a share of the training speakers and must be between 0 and 1 (exclusive)")
    for key in ("max_speakers", "min_utterances", "utts_per_speaker", "min_train_speakers"):
        if v[key] < 2:
            fail(key, "must be 2 or more (a validation EER needs 2 speakers, each with 2 utterances)")
    if v["max_frames"] < 0 or 0 < v["max_frames"] <= XVECTOR_CONTEXT:
        fail("max_frames", f"must be 0 (whole utterances) or more than {XVECTOR_CONTEXT} frames")
    if v["max_trials"] < 100:
        fail("max_trials", "must be at least 100 (fewer trials give no usable EER)")
    if v["seed"] < 0:
        fail("seed", "must be 0 or more")
    if v["trials"] and not v["manifest"]:
        fail("manifest", "must name the manifest of validation.trials (lines: SPEAKER RELPATH)")


# The path-valued keys (``features.cache_dir`` may be empty: no disk cache). ``load_config`` refuses a
# Windows drive or UNC path in any of them on another system, before anything is read or written.
PATH_KEYS = ("data.root", "data.train_manifest", "test.root", "test.test_manifest", "test.trials",
             "test.model_path", "features.cache_dir", "train.save_dir", "validation.trials", "validation.manifest",
             "validation.root", "train.finetune_from", "augment.noise_dir", "augment.rir_dir")


def _validate_paths(cfg: dict) -> None:
    for dotted in PATH_KEYS:
        value = get_key(cfg, dotted)
        if isinstance(value, str) and is_foreign_path(value):
            raise ConfigError(f"{key_source(cfg, dotted)}: key '{dotted}': {foreign_path_problem(value)}")


CORPUS_KEYS = ("name", "root", "train_manifest")  # of each entry of data.corpora (svlab/manifests.py)


def _validate_corpora(cfg: dict) -> None:
    """Checks of ``data.corpora``: each entry a mapping of exactly ``CORPUS_KEYS`` (non-empty strings;
    the name, which prefixes speaker names, of letters, digits, ``_.-``, unique), and no
    ``data.root``/``data.train_manifest`` given beside it."""
    corpora, src = cfg["data"].get("corpora") or [], key_source(cfg, "data.corpora")
    names: set[str] = set()
    for i, corpus in enumerate(corpora):
        key = f"data.corpora[{i}]"
        if not isinstance(corpus, dict):
            raise ConfigError(f"{src}: key '{key}' must be a mapping {{name: ..., root: ..., train_manifest: ...}}, "
                              f"got {excerpt(repr(corpus))}")
        for k in corpus:
            if k not in CORPUS_KEYS:
                raise ConfigError(f"{src}: unknown key '{key}.{excerpt(str(k))}'; a corpus has "
                                  f"{', '.join(CORPUS_KEYS)}")
        for k in CORPUS_KEYS:
            value = corpus.get(k)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{src}: key '{key}.{k}' must be a non-empty string (quote a number), got "
                                  f"{excerpt(repr(value))}")
            if k != "name" and is_foreign_path(value):
                raise ConfigError(f"{src}: key '{key}.{k}': {foreign_path_problem(value)}")
        name = corpus["name"]
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ConfigError(f"{src}: key '{key}.name' is {excerpt(repr(name))}; use letters, digits, '_', '.', '-' "
                              "(it prefixes the corpus's speaker names: NAME:SPEAKER)")
        if name in names:
            raise ConfigError(f"{src}: key '{key}.name' {name!r} names two corpora; give each its own name")
        names.add(name)
    given = [k for k in ("data.root", "data.train_manifest") if k in explicit_keys(cfg)]
    if corpora and given:
        raise ConfigError(f"{key_source(cfg, given[0])}: key '{given[0]}' is set beside data.corpora, which replaces "
                          "data.root and data.train_manifest; give the training data one way")


def config_path_value(cfg: dict, dotted: str) -> Path:
    """Resolve a path-valued config key (relative to the project folder); a ``ConfigError`` names the
    key and the file that set it (empty, or a Windows path on another system)."""
    value = get_key(cfg, dotted)
    if value is None or not str(value).strip():
        raise ConfigError(f"{key_source(cfg, dotted)}: key '{dotted}' is empty; set it to a path")
    try:
        return resolve_path(value)
    except ConfigError as e:
        raise ConfigError(f"{key_source(cfg, dotted)}: key '{dotted}': {e}") from None


def public_config(cfg: dict) -> dict:
    """Copy without private entries (``_config_path``), e.g. to store inside a checkpoint."""
    return {k: copy.deepcopy(v) for k, v in cfg.items() if not k.startswith("_")}
