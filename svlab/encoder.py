"""``SpeakerEncoder``: a trained model as a Python object; embeddings, cosine scores and decisions.

    from svlab import SpeakerEncoder
    enc = SpeakerEncoder.from_checkpoint("saved_model/000/checkpoint_030.pth")   # or a .onnx file
    enc = SpeakerEncoder.pretrained()          # the model shipped in svlab/pretrained/
    e = enc.embed("a.wav")                     # or a numpy array with sample_rate=..., or a list (batched)
    enc.similarity("a.wav", "b.wav")           # cosine
    enc.verify("a.wav", "b.wav")               # score, decision, threshold and where it came from, LLR

Two back ends behind one front end. A ``.pth`` checkpoint runs in PyTorch (``svlab.models``); a
``.onnx`` file written by ``svlab.onnx_export`` runs in onnxruntime and never imports torch (nor does
``import svlab.encoder``). Both read audio (any format, rate and channel count: averaged to mono,
resampled) and compute features with the model's own settings through ``svlab.audio`` and
``svlab.features`` (numpy and librosa), so the two give the same embeddings; no config file is read
that the model does not name. Utterances are batched only with others of the same length (no padding).

``embed`` returns raw embeddings, not length-normalised, as WeSpeaker and SpeechBrain do: averaging or
a PLDA back-end wants them raw, and ``similarity`` normalises (cosine).

The decision threshold (``verify``), always on the cosine score:
  ``.pth``  the EER threshold of the latest plain-cosine evaluation of this very checkpoint file on its
            run's own test trial list (``EER.py`` records them; ``svlab.evaluation.decision_evaluation``),
            found when first needed; with a calibrated one (``EER.py --calibrate``) the LLR as well;
  ``.onnx`` what the export stored in the file's metadata (the same search, at export time);
  pretrained ``.pth``: ``model_card.json`` beside it (keys ``threshold``, ``threshold_source`` and
            optionally ``calibration`` ``{"a": .., "b": ..}``: LLR = a * score + b).

Audio below the model's rate (an 8 kHz file for a 16 kHz model) is resampled up and embedded, with a
warning: the model then sees no energy above the file's Nyquist frequency, so scores are less reliable.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from svlab.audio import one_line, read_audio, size_problem
from svlab.config import CHOICES
from svlab.errors import CheckpointError, DataError, VerifyError
from svlab.features import LEGACY_FEATURE_DEFAULTS, equal_length_batches, extract, feature_signature
from svlab.text import printable

ONNX_FORMAT = "svlab-speaker-encoder/1"   # metadata key svlab.format of the files svlab.onnx_export writes
META = {  # ONNX metadata_props keys (values are strings; JSON where structured)
    "format": "svlab.format", "features": "svlab.features", "model": "svlab.model",
    "embedding_size": "svlab.embedding_size", "threshold": "svlab.threshold",
    "threshold_source": "svlab.threshold_source", "calibration": "svlab.calibration", "source": "svlab.source",
    "exporter": "svlab.exporter",
}
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
PRETRAINED_PTH, PRETRAINED_ONNX, MODEL_CARD = "speaker_encoder.pth", "speaker_encoder.onnx", "model_card.json"
BATCH_SIZE = 64
EMBED_CHUNK = 512  # recordings whose features SpeakerEncoder.embed holds at once
EPS = 1e-12  # norm floor of l2_normalize (torch.nn.functional.normalize's)


@dataclass(frozen=True)
class Verification:
    """``verify``'s answer: the cosine ``score``, whether it is ``accepted`` (score >= threshold), the
    ``threshold`` and ``threshold_source`` (where it came from), and the calibrated log-likelihood
    ratio ``llr`` when the model has a calibration (else None)."""
    score: float
    accepted: bool
    threshold: float
    threshold_source: str
    llr: float | None = None


@dataclass(frozen=True)
class Decision:
    """A model's own threshold (None: it has none, ``source`` says why) and its LLR calibration."""
    threshold: float | None
    source: str
    calibration: dict | None = None   # {"a", "b", "source"}: llr = a * cosine + b


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32), as ``svlab.scoring.length_normalize`` without torch."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float32))
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), EPS)


def enrolment_cosine(enroll: np.ndarray, test: np.ndarray) -> float:
    """Cosine of the averaged length-normalised embeddings of two sets (one row each: the plain cosine)."""
    e, t = l2_normalize(enroll).mean(axis=0), l2_normalize(test).mean(axis=0)
    return float(e @ t / max(np.linalg.norm(e) * np.linalg.norm(t), EPS))


def is_onnx(path) -> bool:
    return Path(path).suffix.lower() == ".onnx"


# ------------------------------------------------------------------------------------------------ back ends
class _OnnxModel:
    """An exported model in onnxruntime (CPU); ``threads``: intra-op threads (None: onnxruntime's default)."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.log_severity_level = 4  # fatal only: its errors reach the user as our one line (embed)
        if threads:
            opts.intra_op_num_threads, opts.inter_op_num_threads = int(threads), 1
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise CheckpointError(f"{printable(path)} is not a readable ONNX model ({one_line(e, 160)}); export it "
                                  "again: python tools/export.py --checkpoint CHECKPOINT.pth --out MODEL.onnx") from None
        self.input = self.session.get_inputs()[0].name
        self.meta = dict(self.session.get_modelmeta().custom_metadata_map)

    def __call__(self, feats: list[np.ndarray], batch_size: int) -> np.ndarray:
        out = None
        for idx in equal_length_batches([f.shape[1] for f in feats], batch_size):
            e = self.session.run(None, {self.input: np.stack([feats[i] for i in idx]).astype(np.float32)})[0]
            if out is None:
                out = np.zeros((len(feats), e.shape[1]), dtype=np.float32)
            out[idx] = e
        return out


class _TorchModel:
    """A checkpoint's network in PyTorch (``svlab.models``; torch is imported here, not before)."""

    def __init__(self, state: dict, device="cpu"):
        from svlab.models import model_from_checkpoint
        self.device = device
        self.model = model_from_checkpoint(state, device)

    def __call__(self, feats: list[np.ndarray], batch_size: int) -> np.ndarray:
        from svlab.embedding import embed_features
        return embed_features(self.model, feats, batch_size, self.device, desc="embedding")


def onnx_settings(path: Path, meta: dict) -> tuple[dict, dict, Decision]:
    """``(feature settings, model info, decision)`` from an exported file's metadata; CheckpointError
    (one line: the file and the fix) for an ONNX file that ``svlab.onnx_export`` did not write."""
    name = printable(path)
    if meta.get(META["format"]) != ONNX_FORMAT:
        raise CheckpointError(f"{name} is an ONNX model but not one exported by this project (no '{ONNX_FORMAT}' "
                              "in its metadata, so its feature settings are unknown); export one with "
                              "python tools/export.py --checkpoint CHECKPOINT.pth --out MODEL.onnx")
    try:
        feat = json.loads(meta[META["features"]])
        model = json.loads(meta[META["model"]])
        thr = meta.get(META["threshold"], "")
        cal = json.loads(meta[META["calibration"]]) if meta.get(META["calibration"]) else None
        decision = Decision(float(thr) if thr else None, meta.get(META["threshold_source"], ""), cal)
        feat_cfg = {**LEGACY_FEATURE_DEFAULTS, **feat, "cache_dir": "", "max_seconds": None}
        feature_signature(feat_cfg)  # every key there
        if feat_cfg["type"] not in CHOICES["features.type"]:
            raise ValueError(f"features.type {feat_cfg['type']!r} is not one this version computes")
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{name}: damaged svlab metadata ({type(e).__name__}: {one_line(e, 80)}); export it "
                              "again with python tools/export.py") from None
    return feat_cfg, model, decision


def checkpoint_feature_settings(state: dict) -> dict:
    """The feature settings a checkpoint's network was trained with (its recorded ``features`` section;
    no config file read), for embedding whole utterances (no cache; the reading limit the largest)."""
    from svlab.embedding import checkpoint_features
    recorded = {**LEGACY_FEATURE_DEFAULTS, **state["config"]["features"], "max_seconds": None}
    return checkpoint_features({"features": recorded}, state, log=lambda *a: None, cache=False)


def _plain(m: dict) -> bool:
    return (m.get("scorer") or "cosine") == "cosine" and (m.get("score_norm") or "none") == "none" \
        and not m.get("center")


def checkpoint_decision(checkpoint: Path, state: dict) -> Decision:
    """The cosine decision threshold of a checkpoint file: the EER threshold of the latest plain-cosine
    evaluation of this very file on its run's own test trial list (``decision_evaluation``), and the
    calibration of the latest calibrated one there; ``threshold`` None (``source`` says why) without one."""
    from svlab.backend import checkpoint_fingerprint, load_backend
    from svlab.evaluation import decision_evaluation, display_path, evaluation_entries, run_trial_list
    checkpoint = Path(checkpoint)
    fix = f"run 'python EER.py --checkpoint {display_path(checkpoint)}' to get its EER threshold"
    own = run_trial_list(state)
    if own is None:
        return Decision(None, f"no threshold: {checkpoint.name} records no test trial list; {fix}")
    # the plain cosine system: the fields decision_evaluation compares (scorer, normalisation, centering)
    cosine = SimpleNamespace(backend="cosine", score_norm="none", center=False, asnorm_top_n=None, label="cosine",
                             lda_dim=0)
    found = decision_evaluation(checkpoint, own, cosine)
    if found is None or not _plain(found[1]):
        return Decision(None, f"no threshold: no plain-cosine evaluation of {checkpoint.name} on "
                              f"{display_path(own.path)}; {fix}")
    path, m, _ = found
    fp = checkpoint_fingerprint(checkpoint)
    if m.get("fingerprint") and m["fingerprint"] != fp:
        return Decision(None, f"no threshold: {display_path(path)} evaluated another version of {checkpoint.name}; {fix}")
    source = (f"EER threshold of evaluation {display_path(path.parent)} on {display_path(m.get('trials', '?'))} "
              f"(EER {float(m['eer']) * 100:.2f}%, cosine)")
    calibration = None
    cal = [(p, c) for p, c in evaluation_entries(checkpoint) if own.matches(c) and _plain(c) and c.get("calibrated")
           and c.get("backend_file") and c.get("fingerprint", fp) == fp]
    if cal:
        p, c = cal[-1]
        _, calibrator, _ = load_backend(p.parent / c["backend_file"], None)
        if calibrator is not None:
            calibration = {"a": calibrator.a, "b": calibrator.b, "source": f"calibration of {display_path(p.parent)}"}
    return Decision(float(m["threshold"]), source, calibration)


def card_decision(card: Path) -> Decision:
    """The threshold (and calibration) a pretrained model's ``model_card.json`` states."""
    try:
        data = json.loads(Path(card).read_text(encoding="utf-8"))
        thr = data.get("threshold")
        return Decision(None if thr is None else float(thr),
                        str(data.get("threshold_source") or f"threshold of {card.name}"), data.get("calibration"))
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{printable(card)}: not a readable model card ({one_line(e, 100)}); restore it from "
                              "the repository (git checkout -- svlab/pretrained)") from None


# ------------------------------------------------------------------------------------------------ the encoder
class SpeakerEncoder:
    """A trained speaker-embedding model: build it with ``from_checkpoint(path)`` (.pth or .onnx) or
    ``pretrained()``. ``log``: where notes go (default: ``warnings.warn``)."""

    def __init__(self, model, source: Path, feat_cfg: dict, info: dict, decision, log=None):
        self._model, self.source, self.features, self.info = model, Path(source), feat_cfg, info
        self._decision = decision  # a Decision, or a function giving one (found when first needed)
        self.log = log or (lambda msg: warnings.warn(msg, UserWarning, stacklevel=4))

    # ---- construction
    @classmethod
    def from_checkpoint(cls, path, threads: int | None = None, device="cpu", log=None,
                        decision: Decision | None = None) -> "SpeakerEncoder":
        """A ``.pth`` checkpoint (PyTorch) or a ``.onnx`` export (onnxruntime: torch never imported).
        ``threads``: onnxruntime's intra-op threads (PyTorch's are the process's, ``torch.set_num_threads``);
        ``decision``: a threshold to use instead of the model's own."""
        path = Path(path)
        if is_onnx(path):
            if not path.is_file():
                raise CheckpointError(f"ONNX model not found: {printable(path)}")
            model = _OnnxModel(path, threads)
            feat_cfg, info, own = onnx_settings(path, model.meta)
            info = {**info, "backend": "onnxruntime"}
            return cls(model, path, feat_cfg, info, decision or own, log)
        try:
            from svlab.checkpoint import load_checkpoint
        except ImportError as e:
            raise CheckpointError(f"{printable(path)} is a PyTorch checkpoint, and torch cannot be imported "
                                  f"({one_line(e, 80)}): install torch, or use an exported .onnx model") from None
        state = load_checkpoint(path)
        try:
            feat_cfg = checkpoint_feature_settings(state)
            model = _TorchModel(state, device)
        except (KeyError, TypeError, AttributeError, RuntimeError) as e:  # RuntimeError: weights that do not fit
            raise CheckpointError(f"{printable(path)} does not describe a network of this project ({type(e).__name__}: "
                                  f"{one_line(e, 80)}); retrain or pick another checkpoint") from None
        m = state["config"]["model"]
        info = {"name": m["name"], "pooling": m["pooling"], "embedding_size": int(m["embedding_size"]),
                "tag": state.get("tag", ""), "epoch": state.get("epoch"), "backend": "pytorch"}
        return cls(model, path, feat_cfg, info, decision or (lambda: checkpoint_decision(path, state)), log)

    @classmethod
    def pretrained(cls, threads: int | None = None, log=None, folder: Path | None = None) -> "SpeakerEncoder":
        """The model shipped in ``svlab/pretrained/``: ``speaker_encoder.pth`` when torch imports, else
        ``speaker_encoder.onnx`` (``model_card.json`` says what it is, and the .pth's threshold)."""
        folder = Path(folder) if folder is not None else PRETRAINED_DIR
        pth, onnx_file, card = folder / PRETRAINED_PTH, folder / PRETRAINED_ONNX, folder / MODEL_CARD
        try:
            import torch  # noqa: F401  (only to know whether the .pth can run)
            use_torch = pth.is_file()
        except ImportError:
            use_torch = False
        path = pth if use_torch else onnx_file
        for needed in (path, card):
            if not needed.is_file():
                raise CheckpointError(f"the pretrained model's file {printable(needed)} is missing; restore it "
                                      "(git checkout -- svlab/pretrained) or use SpeakerEncoder.from_checkpoint(PATH)")
        return cls.from_checkpoint(path, threads=threads, log=log,
                                   decision=card_decision(card) if use_torch else None)

    # ---- what it is
    @property
    def sample_rate(self) -> int:
        return int(self.features["sample_rate"])

    @property
    def embedding_size(self) -> int:
        return int(self.info["embedding_size"])

    @property
    def decision(self) -> Decision:
        if callable(self._decision):
            self._decision = self._decision()
        return self._decision

    def __repr__(self) -> str:
        return (f"SpeakerEncoder({self.source.name}: {self.info.get('name')} {self.info.get('pooling')}, "
                f"{self.embedding_size}-dim, {self.info.get('backend')}, {self.sample_rate} Hz)")

    # ---- audio in, embeddings out
    def _waveform(self, x, sample_rate) -> tuple[np.ndarray, str, int]:
        """``(mono float32 waveform at the model's rate, name for messages, original rate)``."""
        min_s = float(self.features.get("min_seconds") or 0.0)
        if isinstance(x, (str, Path)):
            wav, sr, _ = read_audio(Path(x), self.sample_rate, min_s, self.features.get("max_seconds"))
            return wav, printable(Path(x)), sr
        return array_waveform(x, sample_rate, self.sample_rate, min_s), "the array", int(sample_rate)

    def embed(self, x, sample_rate: int | None = None, batch_size: int = BATCH_SIZE) -> np.ndarray:
        """Raw embedding ``(embedding_size,)`` of one recording (a path, or a numpy array of samples with
        ``sample_rate``), or ``(n, embedding_size)`` of a list of them (batched). One DataError lists
        every recording that cannot be used."""
        single = not isinstance(x, (list, tuple))
        items = [x] if single else list(x)
        if not items:
            raise DataError("nothing to embed: the list of recordings is empty")
        chunks, problems, low = [], [], []
        # A chunk of recordings at a time: features of at most EMBED_CHUNK recordings are in memory, however
        # long the list. Every recording is still checked, so one error names all the unusable ones.
        for start in range(0, len(items), EMBED_CHUNK):
            feats = []
            for item in items[start:start + EMBED_CHUNK]:
                try:
                    wav, name, sr = self._waveform(item, sample_rate)
                    f = extract(wav, self.features)
                    if not np.all(np.isfinite(f)):
                        raise DataError(f"{name}: features are not finite (NaN/inf)")
                    feats.append(f)
                    if sr < self.sample_rate and sr / 2 < float(self.features["fmax"]):
                        low.append(f"{name} ({sr} Hz)")
                except DataError as e:
                    problems.append(one_line(e, 300))
            if not problems:  # after the first unusable recording the rest are only checked
                chunks.append(self._embed_features(feats, batch_size))
        if problems:
            raise DataError(f"{len(problems)} unusable recording(s): {'; '.join(problems[:5])}"
                            f"{f' (and {len(problems) - 5} more)' if len(problems) > 5 else ''}. Check each file "
                            "(a readable WAV/FLAC recording of speech) or pass another one")
        if low:
            self.log(f"note: {', '.join(low[:3])}{' ...' if len(low) > 3 else ''} resampled up to {self.sample_rate} Hz "
                     f"for {self.source.name}, which was trained on audio up to "
                     f"{min(float(self.features['fmax']), self.sample_rate / 2):g} Hz: the band above the file's "
                     "Nyquist frequency is empty, so scores are less reliable; record at the model's rate if you can")
        emb = np.concatenate(chunks)
        return emb[0] if single else emb

    def _embed_features(self, feats: list[np.ndarray], batch_size: int) -> np.ndarray:
        try:
            return self._model(feats, batch_size)
        except Exception as e:  # onnxruntime's and torch's errors, e.g. fewer frames than the network's context
            shortest = min(f.shape[1] for f in feats)
            seconds = shortest * float(self.features["hop_length_ms"]) / 1000
            raise DataError(f"{self.source.name} could not embed the recording(s) ({type(e).__name__}: "
                            f"{one_line(e, 120)}); the shortest has {shortest} frames ({seconds:.2f} s): "
                            "pass longer recordings") from None

    def similarity(self, a, b, sample_rate: int | None = None) -> float:
        """Cosine similarity of two recordings (paths or arrays), in [-1, 1]."""
        e = self.embed([a, b], sample_rate=sample_rate)
        return enrolment_cosine(e[:1], e[1:])

    def verify(self, a, b, sample_rate: int | None = None, threshold: float | None = None) -> Verification:
        """Same speaker? The cosine score against ``threshold`` (default: the model's own, see the
        module docstring); VerifyError (one line) when the model has none and none is given."""
        score = self.similarity(a, b, sample_rate)
        d = self.decision
        if threshold is not None:
            thr, source = float(threshold), "given by the caller"
        elif d.threshold is None:
            raise VerifyError(f"{printable(self.source)} has no decision threshold ({d.source}); or pass "
                              "threshold=T")
        else:
            thr, source = d.threshold, d.source
        llr = None
        if d.calibration:
            llr = float(d.calibration["a"]) * score + float(d.calibration["b"])
        return Verification(score, bool(score >= thr), thr, source, llr)


def array_waveform(x, sample_rate, target_rate: int, min_seconds: float = 0.0) -> np.ndarray:
    """A numpy array of samples as a mono float32 waveform at ``target_rate``: 1-D, or 2-D with the
    channels on the shorter axis (soundfile's ``(samples, channels)`` and torchaudio's
    ``(channels, samples)`` both work), averaged to mono; integer samples scaled to [-1, 1]; resampled."""
    if sample_rate is None:
        raise DataError("an array of samples needs sample_rate=... (the rate it was recorded at, e.g. 16000)")
    try:
        arr = np.asarray(x)
        sr = int(sample_rate)
    except (TypeError, ValueError) as e:
        raise DataError(f"not audio: {one_line(e, 80)}; pass a file path or a numpy array of samples") from None
    if arr.dtype.kind in "iu":
        info = np.iinfo(arr.dtype)
        arr = (arr.astype(np.float64) - (info.max + 1 + info.min) / 2) / ((info.max - info.min + 1) / 2)
    elif arr.dtype.kind != "f":
        raise DataError(f"an array of {arr.dtype} is not audio; pass float or integer samples")
    if arr.ndim == 2:
        arr = arr.mean(axis=int(np.argmin(arr.shape)))
    if arr.ndim != 1 or arr.size == 0:
        raise DataError(f"an array of shape {arr.shape} is not a recording; pass (samples,) or (samples, channels)")
    too_big = size_problem(arr.size, sr, 1)
    if too_big:
        raise DataError(f"the array: {too_big}")
    if not np.all(np.isfinite(arr)):
        raise DataError("the array has NaN or infinite samples")
    wav = arr.astype(np.float32)
    if sr != target_rate:
        import librosa
        wav = librosa.resample(wav, orig_sr=sr, target_sr=target_rate).astype(np.float32)
    if float(np.max(np.abs(wav))) == 0.0:
        raise DataError("the array is silent (all samples are zero)")
    if min_seconds and wav.size < min_seconds * target_rate:
        raise DataError(f"the array is too short ({wav.size / target_rate:.3f} s; the model needs at least "
                        f"{min_seconds:g} s)")
    return np.ascontiguousarray(wav)


__all__ = ["SpeakerEncoder", "Verification", "Decision"]


# ------------------------------------------------------------------------------------------------ commands
def add_model_arguments(ap) -> None:
    """The model options of tools/extract.py, similarity.py and verify.py."""
    ap.add_argument("--checkpoint", default=None,
                    help="model: a checkpoint (.pth) or an ONNX export (.onnx; runs without torch) "
                         "(default: test.model_path)")
    ap.add_argument("--pretrained", action="store_true",
                    help="use the model shipped in svlab/pretrained/ (no training needed)")


def command_model(args) -> tuple[Path | None, dict | None]:
    """``(model path, config)`` of a command: ``--pretrained`` (path None), ``--checkpoint`` or the config's
    ``test.model_path``. The config (``--config``, ``--set``) is read only where needed: for the
    default model and for a .pth (its evaluation settings); never for an .onnx or the pretrained model."""
    from svlab.config import config_path_value, load_config, parse_override
    from svlab.embedding_files import cli_path
    if getattr(args, "pretrained", False):
        if args.checkpoint:
            raise VerifyError("give either --checkpoint or --pretrained, not both")
        return None, None
    path = cli_path(args.checkpoint) if args.checkpoint else None
    cfg = None
    if path is None or not is_onnx(path):
        cfg = load_config(getattr(args, "config", None), dict(parse_override(s) for s in getattr(args, "set", [])))
        path = path or config_path_value(cfg, "test.model_path")
    return path, cfg


def command_encoder(path: Path | None, log=None) -> SpeakerEncoder:
    """The encoder of a command's model (``command_model``), notes to ``log``."""
    return SpeakerEncoder.pretrained(log=log) if path is None else SpeakerEncoder.from_checkpoint(path, log=log)
