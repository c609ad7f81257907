"""Inference helpers shared by the entry scripts: device choice, the checkpoint's feature settings,
batched whole-utterance embedding, and writing embeddings.

``features`` are ``(n_mfcc, frames)`` float32 arrays (``svlab.features.mfcc``); embeddings are
``(n_utterances, embedding_size)`` float32. Utterances are batched only with others of exactly the same
length, so batched embedding equals one-at-a-time embedding for every model (no padding).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from svlab.cpu_runtime import warm_up_vector_math
from svlab.errors import DataError
from svlab.embedding_files import cli_path, index_path, save_embeddings  # noqa: F401 (torch-free; used here and re-exported)
from svlab.feature_cache import TEST_AUDIO_FIX, load_features, load_stored_features, training_store_corpus, uses_store
from svlab.features import BATCH_FRAMES, LEGACY_FEATURE_DEFAULTS, equal_length_batches, feature_signature


def select_device(gpu: str | None) -> torch.device:
    """``--gpu`` value -> device: ``-1``/``cpu`` the CPU, an index that CUDA device, None GPU 0 if any."""
    if gpu is not None and str(gpu).strip() in ("-1", "cpu"):
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(gpu) if gpu is not None else 0}")
    if gpu is not None:
        print(f"note: --gpu {gpu} asked for, but CUDA is not available; using the CPU")
    return torch.device("cpu")


def checkpoint_features(cfg: dict, state: dict, log=print, cache: bool = True) -> dict:
    """Feature settings to embed with: the checkpoint's recorded ones (a model only works with the
    features it was trained on); the disk cache folder and the store settings, which say where features are
    kept, not what they are, come from ``cfg`` (``cache=False``: none)."""
    feat_cfg = {**cfg["features"], **LEGACY_FEATURE_DEFAULTS, **state["config"]["features"],
                **{k: cfg["features"][k] for k in ("store", "store_shard_size", "store_check") if k in cfg["features"]},
                "cache_dir": cfg["features"]["cache_dir"] if cache else "",
                "max_seconds": cfg["features"].get("max_seconds")}  # a reading limit of this run, not of the model
    if feature_signature(feat_cfg) != feature_signature(cfg["features"]):
        log("note: using the checkpoint's feature settings, which differ from the config's")
    return feat_cfg


@torch.no_grad()
def embed_features(model: torch.nn.Module, features: list[np.ndarray], batch_size: int,
                   device: torch.device | str = "cpu", desc: str = "embedding",
                   max_frames: int = BATCH_FRAMES) -> np.ndarray:
    """Embeddings ``(n, embedding_size)`` float32 of whole-utterance features ``(n_mfcc, frames)``: arrays,
    or ``svlab.feature_store.FeatureRef``s, which are read a batch at a time (memory: the embeddings and one
    batch of at most ``batch_size`` utterances and ``max_frames`` frames)."""
    from tqdm import tqdm
    warm_up_vector_math()  # exact float math in the model's first multi-threaded calls
    device = torch.device(device)
    out = None
    # longest first, as dataset.SpkTestDataset batches: later batches reuse the memory of earlier, longer ones
    batches = equal_length_batches([f.shape[1] for f in features], batch_size, max_frames)[::-1]
    for idx in tqdm(batches, desc=desc, unit="batch", leave=False, file=sys.stderr, disable=None):
        x = torch.stack([torch.from_numpy(np.ascontiguousarray(features[i])) for i in idx]).to(device)
        e = model(x).float().cpu().numpy()
        if out is None:
            out = np.zeros((len(features), e.shape[1]), dtype=np.float32)
        out[idx] = e
    if out is None:
        raise DataError("nothing to embed: no utterances")
    return out


def features_to_embed(paths: list[Path], feat_cfg: dict, policy: str = "error", log=print, desc: str = "features",
                      fix: str | None = None, store_corpus: tuple[list[Path], list[str]] | None = None
                      ) -> tuple[list, list[int], list[str]]:
    """``(features, kept indices, problems)`` of audio files to embed, as ``load_features`` gives them.

    With ``uses_store(feat_cfg)`` (``features.store`` and a ``cache_dir``) they are ``FeatureRef``s into the
    on-disk store of ``store_corpus = (paths, keys)`` (training's list for the back-end; default: these files,
    keyed by their paths), built or completed and checked at start as training's store is, reused by the next
    run, and read one utterance at a time when embedded: memory holds the store's index, not the features.
    Otherwise arrays in RAM (``load_features``: all of them at once, the ``.npz`` cache).
    """
    paths = [Path(p) for p in paths]
    if uses_store(feat_cfg):
        corpus = store_corpus if store_corpus is not None else (paths, [str(p) for p in paths])
        return load_stored_features(paths, corpus, feat_cfg, policy=policy, log=log, desc=desc, fix=fix)
    return load_features(paths, feat_cfg, policy=policy, log=log, desc=desc, fix=fix)


def manifest_features(utts: list, root: Path, feat_cfg: dict, log=print) -> tuple[list, list[int]]:
    """``(features, kept indices)`` of the test manifest's utterances ``utts`` under ``root`` (an unusable file
    is an error ending with ``TEST_AUDIO_FIX``): from the test list's own on-disk store, keyed like
    training's (``training_store_corpus``), or in RAM with ``features.store: false`` (``features_to_embed``)."""
    paths, keys = training_store_corpus(utts, root)
    feats, kept, _ = features_to_embed(paths, feat_cfg, "error", log, "test features", TEST_AUDIO_FIX, (paths, keys))
    return feats, kept


def embed_files(model: torch.nn.Module, paths: list[Path], feat_cfg: dict, batch_size: int = 64,
                device: torch.device | str = "cpu", policy: str = "error", log=print,
                desc: str = "features", fix: str | None = None,
                store_corpus: tuple[list[Path], list[str]] | None = None,
                max_frames: int = BATCH_FRAMES) -> tuple[np.ndarray, list[int], list[str]]:
    """Embed audio files: ``(embeddings of the usable files, their indices in paths, problems)``.

    ``policy="error"`` raises one DataError listing every unusable file, ending with ``fix`` (default:
    check the files or pass others, ``svlab.feature_cache.AUDIO_FIX``); ``"skip"`` leaves them out.
    Features as ``features_to_embed`` gives them: with ``uses_store(feat_cfg)`` from the on-disk store of
    ``store_corpus=(paths, keys)`` (training's list for the back-end; default these files), read batch by batch
    (the same arrays as ``load_features``, never all in RAM), else from ``load_features``.
    """
    feats, kept, problems = features_to_embed(paths, feat_cfg, policy, log, desc, fix, store_corpus)
    if not feats:
        raise DataError(f"none of the {len(paths)} audio file(s) could be used: {'; '.join(problems[:5])}")
    return embed_features(model, feats, batch_size, device, max_frames=max_frames), kept, problems


def write_embeddings(out: Path, emb: np.ndarray, names: list[str], kaldi_at: Path | None = None, log=print) -> Path:
    """Atomically write ``out`` (float32 .npy) and its index file (one name per row); returns the index path.
    With ``kaldi_at`` also Kaldi's ``xvector.ark``/``.scp`` beside ``out``, the scp naming the ark in folder
    ``kaldi_at`` (where the staged folder will be: ``svlab.kaldi_data.write_xvectors``)."""
    out = Path(out)
    if kaldi_at is not None:
        from svlab.kaldi_data import write_xvectors
        write_xvectors(out.parent, emb, names, final_folder=kaldi_at, log=log)
    return save_embeddings(out, emb, names)
