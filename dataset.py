"""Data for training and testing: manifests -> MFCC features -> fixed-length crops.

1. Manifests (``svlab.manifests``): text files of ``SPEAKER RELPATH`` lines name the utterances;
   RELPATHs are relative to ``data.root`` (training) or ``test.root`` (testing).
2. Features (``svlab.features.mfcc``): each utterance becomes an MFCC array ``(n_mfcc, frames)``
   (25 ms window, 10 ms hop). They are computed once, in parallel, and cached on disk
   (``features.cache_dir``, ``svlab.feature_cache``), so an epoch never re-reads audio. Training and test
   features go to on-disk stores there (``svlab.feature_store``): each crop, and each test utterance, is
   read from disk when used, so memory does not grow with the corpus (``features.store: false``: in RAM).
3. Crops: ``SpkTrainDataset`` cuts a random ``train.crop_frames``-frame window of each training
   utterance per epoch, labelled with its speaker's index; ``SpkTestDataset`` gives whole test
   utterances, to be embedded one by one or in batches of equal length.

Augmentation (``augment:`` config section, off by default) adds offline noisy/reverberant/sped-up
copies of the training utterances (``svlab.augment``) and SpecAugment masks on the crops. Test
utterances are never augmented. Bad manifests and unusable audio stop with one ``DataError``
(``svlab.errors``) that lists every problem with its file and line.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from svlab import augment, online_augment
from svlab.config import config_path_value, key_source
from svlab.embedding import manifest_features
from svlab.feature_cache import load_training_items
from svlab.features import BATCH_FRAMES, equal_length_batches, repeat_to
from svlab.manifests import check_root, read_manifest


class SpkTrainDataset(Dataset):
    """Training utterances as random fixed-length MFCC crops with speaker labels.

    ``opts`` is the full configuration (``svlab.config.load_config``). Item ``i`` is
    ``(features (n_mfcc, crop_frames) float32 tensor, speaker id)``; crops are drawn from a
    generator seeded by ``(train.seed, epoch, i)`` (see ``set_epoch``), so a run is reproducible and
    a resumed run sees the same crops as an uninterrupted one. Utterances shorter than the crop are
    repeat-padded.

    Augmentation (``augment:`` section, off by default; then all of the above is exactly as without
    it): with ``augment.copies`` K > 0 every utterance has K offline augmented versions besides the
    clean one (``svlab.feature_cache.load_training_items``, cached), and each epoch item ``i`` is
    cropped from one of its K + 1 versions, chosen by the same ``(train.seed, epoch, i)`` generator:
    one item per utterance and epoch as before. ``augment.spec_augment`` masks each crop (same
    generator). With ``augment.speed_as_new_speakers`` the speed copies are extra items of new
    speakers (``S0001_sp0.9``): ``speakers`` and the number of items grow. ``augment.mode: online``: each
    crop is read from the waveform and augmented as it is drawn instead (``svlab.online_augment``).

    Attributes: ``speakers`` (sorted speaker names, index = class id), ``utterances`` (one per item;
    speed copies carry the new speaker name and the original relpath), ``labels``, ``skipped``
    (problems of files left out under ``data.bad_audio: skip``), ``features`` (clean features per
    item), ``versions`` (per item, clean + augmented features; None without offline augmentation),
    ``speeds`` (per item, 1.0 or the new-speaker speed factor), ``manifest_speakers`` (the
    speakers of the training manifest).
    """

    def __init__(self, opts: dict, log=print):
        items = load_training_items(opts, log=log)
        self.utterances, self.skipped, self.speeds = items.utterances, items.skipped, items.speeds
        self.manifest_speakers = items.manifest_speakers
        self.speakers = sorted({u.speaker for u in self.utterances})
        index = {s: i for i, s in enumerate(self.speakers)}
        self.labels = [index[u.speaker] for u in self.utterances]

        self.crop_frames = opts["train"]["crop_frames"]
        self.features = [repeat_to(v[0], self.crop_frames) for v in items.versions]
        self.versions = None
        if items.augmented:
            self.versions = [[self.features[j]] + [repeat_to(f, self.crop_frames) for f in v[1:]]
                             for j, v in enumerate(items.versions)]

        aug = augment.settings(opts.get("augment"))
        self.spec_augment = bool(aug["spec_augment"])
        self.spec_masks = dict(n_time_masks=int(aug["time_masks"]), max_time=int(aug["max_time"]),
                               n_freq_masks=int(aug["freq_masks"]), max_freq=int(aug["max_freq"]))
        self.seed = opts["train"]["seed"]
        self.epoch = 0
        self.online = online_augment.for_training(opts, log)  # augment.mode online: crops from the waveform

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.features)

    def choose(self, i: int) -> tuple[int, int, np.random.Generator]:
        """``(version, crop start, generator)`` of item ``i`` this epoch (version 0 = clean); the
        generator is left where SpecAugment continues drawing."""
        rng = np.random.default_rng((self.seed, self.epoch, i))
        n_versions = 1 if self.versions is None else len(self.versions[i])
        version = 0 if n_versions == 1 else int(rng.integers(0, n_versions))
        feat = self.features[i] if version == 0 else self.versions[i][version]
        high = feat.shape[1] - self.crop_frames
        start = 0 if high <= 0 else int(rng.integers(0, high + 1))
        return version, start, rng

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        version, start, rng = self.choose(i)
        feat = self.features[i] if version == 0 else self.versions[i][version]
        crop = feat[:, start:start + self.crop_frames] if self.online is None else self.online.crop(self, i, start, rng)
        if self.spec_augment:
            crop = augment.spec_augment(crop, rng, **self.spec_masks)
        return torch.from_numpy(crop), self.labels[i]

    @staticmethod
    def collate_fn(batch):
        """List of ``(feat, label)`` -> ``(batch, n_mfcc, crop_frames)`` tensor, ``(batch,)`` labels."""
        feats, labels = zip(*batch)
        return torch.stack(feats), torch.tensor(labels, dtype=torch.long)


class SpkTestDataset(Dataset):
    """Whole test utterances (no cropping) for embedding.

    ``opts`` is the full configuration. Item ``i`` is ``(features (n_mfcc, frames) tensor, relpath)``.
    ``equal_length_batches`` groups utterances of identical length so that batched embedding is
    exact for every model (no padding at all). ``relpaths``: embed only these utterances of the
    test manifest (e.g. the ones a trial list uses). ``features``: per utterance a ``FeatureRef`` into the
    test list's on-disk store, read when the item is taken (its ``.shape`` comes from the store's index), or
    an array with ``features.store: false``; the same numbers either way.
    """
    batch_frames = BATCH_FRAMES  # frames an embedding batch holds at most: test.batch_frames once built

    def __init__(self, opts: dict, log=print, relpaths: list[str] | None = None):
        self.root = config_path_value(opts, "test.root")
        manifest = config_path_value(opts, "test.test_manifest")
        utts = read_manifest(manifest, key="test.test_manifest", source=key_source(opts, "test.test_manifest"))
        if relpaths is not None:
            wanted = set(relpaths)
            utts = [u for u in utts if u.relpath in wanted]
        check_root(self.root, utts, "test.root", manifest, key_source(opts, "test.root"))
        self.features, kept = manifest_features(utts, self.root, opts["features"], log=log)
        self.utterances = [utts[i] for i in kept]
        self.index = {u.relpath: i for i, u in enumerate(self.utterances)}
        self.batch_frames = opts["test"]["batch_frames"]

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        return torch.from_numpy(np.asarray(self.features[i])), self.utterances[i].relpath  # read from disk here

    def equal_length_batches(self, batch_size: int) -> list[list[int]]:
        # longest first: each batch's tensors then fit in the memory the (longer) batch before freed; shortest
        # first, each needs a little more than was freed and the heap grows with the test list
        return equal_length_batches([f.shape[1] for f in self.features], batch_size, self.batch_frames)[::-1]

    @staticmethod
    def collate_fn(batch):
        """List of ``(feat, relpath)`` -> zero-padded ``(batch, n_mfcc, max_frames)``, lengths, relpaths."""
        feats, keys = zip(*batch)
        lengths = torch.tensor([f.shape[1] for f in feats], dtype=torch.long)
        out = torch.zeros(len(feats), feats[0].shape[0], int(lengths.max()))
        for j, f in enumerate(feats):
            out[j, :, :f.shape[1]] = f
        return out, lengths, list(keys)
