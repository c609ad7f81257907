"""Checkpoint files: atomic write-then-rename saves and safe (``weights_only=True``) loads.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(..., weights_only=True)`` and never executes pickled code. Keys:

``format``            ``"speaker-lab-checkpoint/1"``
``epoch``             epochs finished
``model_state``       embedding network ``state_dict``
``loss_state``        classification head (``loss.py``) ``state_dict``
``optimizer_state``   / ``scheduler_state``: to resume training
``config``            the full configuration used (features, model, loss, train, ...)
``speakers``          training speaker labels, index = class id
``history``           list of per-epoch dicts (loss, acc, lr, margin, seconds)
``features``          the feature settings the model depends on (``svlab.features.feature_signature``)
``tag``               ``<model>_<pooling>_<loss>``
``scaler_state``      the float16 gradient scaler, when one was used
``validation``        the speakers (and utterances) held apart from training, when any (``svlab.validation``)
``step_in_epoch``     / ``partial``: in ``interrupted.pth`` only, the steps of the next epoch already
                      done and their loss/accuracy sums
``finetuned_from``    a fine-tuning run's source (``train.finetune_from``, ``finetune_config``):
                      ``{"checkpoint", "epoch", "tag", "run_folder"}``
``corpora``           a run on several corpora (``data.corpora``, ``svlab.manifests``): per corpus its
                      ``name``, ``root``, ``train_manifest`` and number of ``speakers``

Run folders are named here and nowhere else (``run_folder``), so are the files in them.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from svlab.config import (PROJECT_ROOT, config_path_value, explicit_keys, flatten, get_key, is_foreign_path,
                          key_source, validate)
from svlab.errors import CheckpointError, ConfigError
from svlab.features import FEATURE_KEYS, LEGACY_FEATURE_DEFAULTS
from svlab.files import atomic_write
from svlab.text import excerpt

FORMAT = "speaker-lab-checkpoint/1"
EPOCH_PATTERN = re.compile(r"^checkpoint_(\d{3,})\.pth$")
INTERRUPTED = "interrupted.pth"  # the resumable state saved on Ctrl-C / SIGTERM, in the run folder


def run_folder(cfg: dict) -> Path:
    """The run folder of ``cfg``: ``<train.save_dir>/<train.n_folder>``, e.g. ``saved_model/000``.

    ``ConfigError`` (one line, the key and the file) unless it lies inside ``train.save_dir``: no empty
    name, no ``.``/``..`` part, no absolute path; and never the project folder or one above it (a run
    writes ``config.yaml`` and checkpoints into its folder)."""
    save_dir = config_path_value(cfg, "train.save_dir")
    name = cfg["train"]["n_folder"]
    text = "" if name is None else str(name)
    parts = text.replace("\\", "/").split("/")
    if not text.strip() or all(part in ("", ".") for part in parts):
        problem = "is empty; give the run folder's name, e.g. 001"
    elif is_foreign_path(text) or text.startswith(("/", "\\")) or Path(text).is_absolute():
        problem = f"is {excerpt(text)}, a path; give a folder name inside train.save_dir, e.g. 001"
    elif ".." in parts or "." in parts:
        problem = (f"is {excerpt(text)}, which leaves or repeats train.save_dir; give a folder name inside it "
                   "without '.' or '..', e.g. 001")
    else:
        folder = save_dir / text.replace("\\", "/")
        resolved, project = folder.resolve(), PROJECT_ROOT.resolve()
        if resolved != project and resolved not in project.parents:
            return folder
        raise ConfigError(f"{key_source(cfg, 'train.save_dir')}: keys 'train.save_dir' and 'train.n_folder' make "
                          f"the run folder {excerpt(str(folder))}, the project folder or one above it; point "
                          "train.save_dir at a folder of its own (default: saved_model)")
    raise ConfigError(f"{key_source(cfg, 'train.n_folder')}: key 'train.n_folder' {problem}")


def save_checkpoint(state: dict, path: Path) -> None:
    """Atomically save a checkpoint dict (see module docstring for its keys)."""
    state = dict(state)
    state.setdefault("format", FORMAT)

    def write(tmp: Path) -> None:
        # through a Python file object: a full disk then raises OSError(ENOSPC), where torch's own
        # path writer raises an opaque RuntimeError ("enforce fail at inline_container.cc")
        with open(tmp, "wb") as f:
            torch.save(state, f)
    atomic_write(Path(path), write)


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; clear one-line errors for every failure."""
    path = Path(path)
    if not path.is_file():
        raise _unreadable(f"checkpoint not found: {path}{available_hint(path.parent)}",
                          "not a file" if path.exists() else "gone")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types (UnpicklingError, RuntimeError, EOFError)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _unreadable(
            f"{path} is not a readable checkpoint of this project ({excerpt(first, 200)}); "
            "it may be truncated or not a checkpoint at all. Retrain or pick another file",
            f"unreadable, truncated or not a checkpoint ({excerpt(first.split(': ')[0], 60)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise _unreadable(f"{path} is not a checkpoint of this project (no '{FORMAT}' marker)",
                          f"not a checkpoint of this project (no '{FORMAT}' marker)")
    for key in ("model_state", "config", "speakers", "epoch"):
        if key not in state:
            raise _unreadable(f"{path} lacks '{key}'; it is incomplete. Retrain or pick another file",
                              f"incomplete (no '{key}')")
    return state


def _unreadable(message: str, reason: str) -> CheckpointError:
    """A ``CheckpointError`` with ``reason``, a short why for lists of files (``--resume``)."""
    err = CheckpointError(message)
    err.reason = reason
    return err


def epoch_checkpoint_path(folder: Path, epoch: int) -> Path:
    return Path(folder) / f"checkpoint_{epoch:03d}.pth"


def final_checkpoint_name(model: str, pooling: str, loss: str) -> str:
    """The lab's name for the last checkpoint, e.g. ``xvector_gap_softmax_checkpoint.pth``."""
    return f"{model}_{pooling}_{loss}_checkpoint.pth"


def list_epoch_checkpoints(folder: Path) -> dict[int, Path]:
    """``{epoch: path}`` of the ``checkpoint_NNN.pth`` files in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    found = {}
    for p in folder.iterdir():
        m = EPOCH_PATTERN.match(p.name)
        if m:
            found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def available_hint(folder: Path) -> str:
    found = list_epoch_checkpoints(folder)
    if found:
        return f"; checkpoints in {folder}: epochs {', '.join(str(e) for e in found)}"
    return f"; {folder} has no checkpoint_NNN.pth files (train first: python train.py)"


MISMATCH_SECTIONS = ("model", "features")


def describe_mismatch(state_config: dict, cfg: dict, sections=MISMATCH_SECTIONS,
                      only_keys=None) -> list[str]:
    """What differs between a checkpoint's recorded configuration and ``cfg``, as
    ``'model.channels: checkpoint 512 vs config 32'`` strings (empty list: they agree).

    ``features`` compares only the settings a trained model depends on (``svlab.features.FEATURE_KEYS``;
    not ``cache_dir``). ``only_keys``: restrict to these dotted keys, e.g. ``config.explicit_keys(cfg)``
    to complain only about what the user asked for, not about shipped defaults the checkpoint
    legitimately overrides. A key the checkpoint does not record is not compared.
    """
    out = []
    for section in sections:
        recorded = (state_config or {}).get(section)
        current = cfg.get(section)
        if not isinstance(recorded, dict) or not isinstance(current, dict):
            continue
        if section == "features":  # a checkpoint from before a key existed used its legacy value
            recorded = {**LEGACY_FEATURE_DEFAULTS, **recorded}
        keys = FEATURE_KEYS if section == "features" else sorted(set(recorded) | set(current))
        for k in keys:
            dotted = f"{section}.{k}"
            if only_keys is not None and dotted not in only_keys:
                continue
            if k not in recorded or k not in current:
                continue
            a, b = recorded[k], current[k]
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
                    and not isinstance(b, bool):
                same = float(a) == float(b)
            else:
                same = a == b
            if not same:
                out.append(f"{dotted}: checkpoint {a!r} vs config {b!r}")
    return out


# --------------------------------------------------------------------------- large-margin fine-tuning
# Loss heads whose weights are interchangeable (the same ``W``): a fine-tune may switch between them.
MARGIN_HEADS = ("amsoftmax", "aamsoftmax")
NOT_INHERITED = frozenset({"train.finetune_from", "test.model_path"})


def _same_kind(value, current) -> bool:
    if isinstance(value, bool) or isinstance(current, bool):
        return isinstance(value, bool) and isinstance(current, bool)
    if isinstance(current, float):
        return isinstance(value, (int, float))
    return type(value) is type(current)


@dataclass
class FinetuneSource:
    """The checkpoint a fine-tuning run starts from: its file and its state (``load_checkpoint``)."""
    path: Path
    state: dict

    def record(self) -> dict:
        """What the fine-tune's checkpoints record of it (``finetuned_from``)."""
        return {"checkpoint": str(self.path.resolve()), "epoch": int(self.state["epoch"]),
                "tag": str(self.state.get("tag", "")), "run_folder": str(self.path.resolve().parent)}


def run_location_keys(cfg: dict) -> dict:
    """``{dotted key: value}`` that a command on this run must be given besides its ``--config`` and
    ``--n_folder`` to find the run folder: a fine-tune's ``train.save_dir`` when it is the source's, not
    its config's. (``EER.py`` reads every other setting of the run from its checkpoint, but must find
    the folder first.)"""
    return {key: get_key(cfg, key) for key in cfg.get("_inherited", ()) if key == "train.save_dir"}


def finetune_config(cfg: dict, log=print) -> tuple[dict, FinetuneSource | None]:
    """``(configuration, source)`` of a fine-tuning run (``train.finetune_from`` set;
    ``(cfg, None)`` otherwise): a second stage that starts from the source's weights, network and loss
    head both, e.g. a few epochs on longer crops with a larger margin.

    The run continues the source's recorded configuration: every key the user did not give (in
    ``--config`` or on the command line) is the source's; what the user gave changes it. The network
    and the features come from the checkpoint: a given ``model.*`` or feature setting that differs is
    refused, as is another loss head (only ``amsoftmax`` and ``aamsoftmax``, which share their
    weights, may replace each other). The run folder must not be the source's: a fine-tune never
    writes into the run it starts from. Each refusal is one ``ConfigError`` line naming the key."""
    value = cfg["train"].get("finetune_from", "")
    if not str(value or "").strip():
        return cfg, None
    path = config_path_value(cfg, "train.finetune_from")
    state = load_checkpoint(path)
    given = explicit_keys(cfg)
    where = key_source(cfg, "train.finetune_from")
    diff = describe_mismatch(state["config"], cfg, sections=("model", "features"), only_keys=given)
    if diff:
        key = diff[0].split(":")[0]
        raise ConfigError(f"{key_source(cfg, key)}: {diff[0]}, but a fine-tune keeps the network and features of "
                          f"its source {path}; drop the setting (they come from the checkpoint)")
    recorded = state["config"]
    out = {**copy.deepcopy({k: v for k, v in cfg.items() if not k.startswith("_")}),
           "_config_path": cfg.get("_config_path"), "_sources": dict(cfg.get("_sources", {}))}
    current = flatten({k: v for k, v in cfg.items() if not k.startswith("_")})
    out["_inherited"] = []  # keys whose value is the source's where the config's differs (run_location_keys)
    for key, v in flatten({k: v for k, v in recorded.items() if isinstance(v, dict)}).items():
        if key in given or key in NOT_INHERITED or key not in current or not _same_kind(v, current[key]):
            continue
        if v != current[key]:
            out["_inherited"].append(key)
        *parents, last = key.split(".")
        section = out
        for part in parents:
            section = section[part]
        section[last] = float(v) if isinstance(current[key], float) else copy.deepcopy(v)
    old_loss, new_loss = recorded["loss"]["type"], out["loss"]["type"]
    if old_loss != new_loss and not {old_loss, new_loss} <= set(MARGIN_HEADS):
        raise ConfigError(f"{key_source(cfg, 'loss.type')}: key 'loss.type' is {new_loss}, but the fine-tune source "
                          f"{path} has a {old_loss} head, whose weights a {new_loss} head cannot take; keep "
                          f"{old_loss}" + (" (or switch between amsoftmax and aamsoftmax)" if old_loss in MARGIN_HEADS
                                           else ""))
    validate(out)
    folder, source_folder = run_folder(out), path.parent
    if folder.resolve() == source_folder.resolve():
        raise ConfigError(f"{where}: key 'train.finetune_from' is a checkpoint of the run folder {folder}, which "
                          f"this run would write into; give the fine-tune its own folder, e.g. "
                          f"--n_folder {out['train']['n_folder']}_ft")
    log(f"fine-tuning from {path} (epoch {state['epoch']}, {state.get('tag', '?')}): its network, loss head and "
        "settings, changed by what this run's config and command line give")
    return out, FinetuneSource(path, state)

