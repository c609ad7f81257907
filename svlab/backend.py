"""Classic scoring back-end: two-covariance PLDA and back-end files (PLDA + calibrator, ``svlab.calibration``).

Pipeline (what ``EER.py --backend plda --calibrate`` runs instead of cosine scoring, through
``svlab/scoring_system.py``)::

    training embeddings --split_calibration_speakers--> fit speakers | held-out speakers   (svlab.calibration)
    fit speakers      -> PLDA.fit (centre, optional LDA, optional length norm, B and W)
    held-out speakers -> make_trials_from_labels -> PLDA scores -> ScoreCalibrator.fit
    test trials       -> PLDA.score -> ScoreCalibrator.transform = calibrated LLR
                      -> accept when LLR >= svlab.metrics.bayes_threshold(p_target)

Model (Ioffe 2006; Prince & Elder 2007; the "two-covariance" model of Kaldi's ``ivector-plda``): an
embedding after pre-processing is ``y = m + s + e`` with speaker variable ``s ~ N(0, B)`` shared by all
utterances of a speaker and residual ``e ~ N(0, W)`` drawn per utterance. Verification compares "same
speaker" (one ``s`` for both sides) against "different speakers" (independent ``s``); the score is
the log-likelihood ratio

    LLR(x1, x2) = log N([x1; x2]; [m; m], [[B+W, B], [B, B+W]]) - log N(x1; m, B+W) - log N(x2; m, B+W).

Nothing here pickles: back-end files are ``.npz`` archives of plain arrays plus one JSON string,
loaded with ``allow_pickle=False``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from svlab.calibration import ScoreCalibrator
from svlab.errors import BackendError
from svlab.files import atomic_write

BACKEND_FORMAT = "speaker-lab-backend/1"


# --------------------------------------------------------------------------------------------------
# PLDA
# --------------------------------------------------------------------------------------------------

def _as_2d(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise BackendError(f"{name} must be a 2-D array (n, dim), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise BackendError(f"{name} contains {int((~np.isfinite(x)).sum())} NaN or infinite values")
    return x


def _sym(a: np.ndarray) -> np.ndarray:
    return 0.5 * (a + a.T)


class PLDA:
    """Two-covariance PLDA with a fixed affine pre-processing; LLR scoring of embedding pairs.

    Pre-processing, fitted on the training embeddings by :meth:`fit` and applied by :meth:`transform`:

    1. centre with the training mean (``train_mean``, shape ``(d_in,)``);
    2. optional LDA (``lda_dim``, sklearn ``LinearDiscriminantAnalysis``, svd solver) to ``k <= lda_dim``
       dimensions (``k`` is smaller only when the data have fewer classes or lower rank);
    3. only with ``length_norm``: whiten with the total covariance of the step-2 output (eigenvalues
       floored at 1e-10 x the largest), then scale every vector to Euclidean norm ``sqrt(k)``
       (Garcia-Romero & Espy-Wilson 2011; Kaldi's ``ivector-normalize-length`` scale).

    Steps 1-3 before the norm scaling are one affine map ``y = x @ pre_matrix + pre_offset``.
    The PLDA parameters ``mu`` (``(k,)``), ``between`` (B) and ``within`` (W) (``(k, k)``) live in this
    model space. Without LDA and length norm the model space is the input space shifted by the
    training mean, so B and W are directly the between- and within-speaker covariances of the input.

    Estimation is closed form (method of moments, no EM):

    * ``W`` = pooled within-speaker scatter / (N - K) (N utterances, K speakers); speakers with one
      utterance add nothing to it;
    * ``B`` = covariance of the speaker means (unweighted, / (K - 1)) minus mean_k(1 / n_k) * W, since
      a speaker mean of n_k utterances has covariance ``B + W / n_k``;
    * regularisation: ``W`` gets a ridge of 1e-6 x trace(W) / k (it is singular when k > N - K or
      after length norm removes a direction); ``B`` is made positive semi-definite by clipping its
      generalised eigenvalues (w.r.t. ``W``) at 0, so directions without speaker information simply
      do not contribute to the score.

    Scoring uses the simultaneous diagonalisation ``V.T @ W @ V = I``, ``V.T @ B @ V = diag(psi)``
    (Kaldi): with ``u = (y - mu) @ V`` the LLR is a sum over dimensions,

        LLR = 0.5 * sum(q * (u1**2 + u2**2)) + sum(p * u1 * u2) + c,
        q = 1/(1+psi) - (1+psi)/(1+2 psi),  p = psi/(1+2 psi),  c = 0.5 * sum(2 log(1+psi) - log(1+2 psi)),

    which equals the two-Gaussian formula in the module docstring exactly (the LLR is invariant under
    an invertible linear map applied to both sides).
    """

    def __init__(self):
        self.train_mean: np.ndarray | None = None   # (d_in,)
        self.pre_matrix: np.ndarray | None = None   # (d_in, k)
        self.pre_offset: np.ndarray | None = None   # (k,)
        self.length_norm: bool = False
        self.lda_dim: int = 0                       # 0: no LDA
        self.mu: np.ndarray | None = None           # (k,)
        self.between: np.ndarray | None = None      # (k, k), positive semi-definite
        self.within: np.ndarray | None = None       # (k, k), positive definite
        self.V: np.ndarray | None = None            # (k, k) diagonalising transform
        self.psi: np.ndarray | None = None          # (k,) >= 0
        self.n_speakers: int = 0
        self.n_utterances: int = 0

    # ---- properties -----------------------------------------------------------------------------
    @property
    def fitted(self) -> bool:
        return self.psi is not None

    @property
    def input_dim(self) -> int:
        """Embedding dimension ``d_in`` the model accepts."""
        self._need_fit()
        return int(self.pre_matrix.shape[0])

    @property
    def dim(self) -> int:
        """Model-space dimension ``k``."""
        self._need_fit()
        return int(self.pre_matrix.shape[1])

    def _need_fit(self) -> None:
        if self.psi is None:
            raise BackendError("the PLDA model is not fitted (call fit() or load a back-end file)")

    # ---- fitting --------------------------------------------------------------------------------
    def fit(self, X, labels: Sequence, lda_dim: int | None = None, length_norm: bool = True) -> "PLDA":
        """Fit pre-processing and PLDA on training embeddings; returns ``self``.

        X: ``(n, d_in)`` embeddings; labels: ``n`` speaker ids (any hashable values: str or int);
        lda_dim: LDA output dimension (``1 <= lda_dim <= min(d_in, K - 1)``) or ``None`` for no LDA;
        length_norm: whiten + scale to norm ``sqrt(k)`` (see the class docstring).
        Needs at least 2 speakers and at least one speaker with 2 or more utterances.
        """
        X = _as_2d(X, "training embeddings")
        labels = np.asarray(list(labels))
        if labels.shape[0] != X.shape[0]:
            raise BackendError(f"{X.shape[0]} training embeddings but {labels.shape[0]} speaker labels")
        _, y_idx = np.unique(labels, return_inverse=True)
        y_idx = y_idx.ravel()
        n, d_in = X.shape
        counts = np.bincount(y_idx)
        K = counts.size
        if K < 2:
            raise BackendError(f"PLDA needs at least 2 training speakers, got {K}")
        if n - K < 1:
            raise BackendError("PLDA needs at least one training speaker with 2 or more utterances")

        self.train_mean = X.mean(axis=0)
        A = np.eye(d_in)
        c = -self.train_mean
        Z = X - self.train_mean
        self.lda_dim = 0
        if lda_dim is not None:
            lda_dim = int(lda_dim)
            max_dim = min(d_in, K - 1)
            if not 1 <= lda_dim <= max_dim:
                raise BackendError(f"lda_dim={lda_dim} is out of range: it must be between 1 and "
                                   f"min(embedding dim {d_in}, speakers - 1 = {K - 1}) = {max_dim}")
            from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
            lda = LinearDiscriminantAnalysis(n_components=lda_dim, solver="svd")
            lda.fit(Z, y_idx)
            # The sklearn transform is affine: read its matrix and offset off the origin and the basis
            # so that the model stores plain arrays (no sklearn object, no pickle).
            basis = lda.transform(np.vstack([np.zeros((1, d_in)), np.eye(d_in)]))
            a_off, a_mat = basis[0], basis[1:] - basis[0]
            A, c = A @ a_mat, c @ a_mat + a_off
            Z = Z @ a_mat + a_off
            self.lda_dim = lda_dim
        if length_norm:
            zmean = Z.mean(axis=0)
            evals, evecs = np.linalg.eigh(_sym(np.cov(Z, rowvar=False).reshape(Z.shape[1], Z.shape[1])))
            evals = np.maximum(evals, 1e-10 * max(float(evals.max()), 1e-300))
            whiten = evecs / np.sqrt(evals)
            A, c = A @ whiten, (c - zmean) @ whiten
        self.pre_matrix, self.pre_offset, self.length_norm = A, c, bool(length_norm)

        Y = self.transform(X)
        self._estimate(Y, y_idx, counts)
        self.n_speakers, self.n_utterances = int(K), int(n)
        return self

    def _estimate(self, Y: np.ndarray, y_idx: np.ndarray, counts: np.ndarray) -> None:
        n, k = Y.shape
        K = counts.size
        sums = np.zeros((K, k))
        np.add.at(sums, y_idx, Y)
        means = sums / counts[:, None]
        resid = Y - means[y_idx]
        W = _sym(resid.T @ resid) / (n - K)
        dm = means - means.mean(axis=0)
        B = _sym(dm.T @ dm) / (K - 1) - float(np.mean(1.0 / counts)) * W
        self._set_params(Y.mean(axis=0), B, W)

    def _set_params(self, mu, B, W) -> None:
        """Regularise B and W, diagonalise them jointly and store everything (model space)."""
        k = W.shape[0]
        ridge = 1e-6 * float(np.trace(W)) / k
        W = _sym(W) + max(ridge, 1e-12) * np.eye(k)
        L = np.linalg.cholesky(W)
        Linv = np.linalg.inv(L)
        psi, E = np.linalg.eigh(_sym(Linv @ _sym(B) @ Linv.T))
        psi = np.maximum(psi, 0.0)
        V = Linv.T @ E                           # V.T W V = I, V.T B V = diag(psi)
        Vinv = np.linalg.inv(V)
        self.mu = np.asarray(mu, dtype=np.float64)
        self.within = W
        self.between = _sym(Vinv.T @ np.diag(psi) @ Vinv)  # B with negative eigenvalues clipped
        self.V, self.psi = V, psi

    @classmethod
    def from_params(cls, mean, between, within) -> "PLDA":
        """A PLDA model with known parameters and no pre-processing (model space = input space).

        mean: ``(d,)``; between, within: ``(d, d)`` symmetric (W positive definite). Useful for oracle
        scores in tests and simulations.
        """
        mean = np.asarray(mean, dtype=np.float64).ravel()
        d = mean.size
        p = cls()
        p.train_mean = np.zeros(d)
        p.pre_matrix, p.pre_offset, p.length_norm = np.eye(d), np.zeros(d), False
        p._set_params(mean, np.asarray(between, dtype=np.float64), np.asarray(within, dtype=np.float64))
        return p

    # ---- transforms -----------------------------------------------------------------------------
    def transform(self, X) -> np.ndarray:
        """Pre-processing: ``(n, d_in)`` embeddings -> ``(n, k)`` model-space vectors (see class doc)."""
        X = _as_2d(X, "embeddings")
        if self.pre_matrix is None:
            raise BackendError("the PLDA model is not fitted (call fit() or load a back-end file)")
        if X.shape[1] != self.pre_matrix.shape[0]:
            raise BackendError(f"embeddings have dimension {X.shape[1]} but the back-end was trained on "
                               f"dimension {self.pre_matrix.shape[0]}; retrain the back-end for this model")
        Y = X @ self.pre_matrix + self.pre_offset
        if self.length_norm:
            norms = np.linalg.norm(Y, axis=1, keepdims=True)
            Y = Y * (np.sqrt(Y.shape[1]) / np.maximum(norms, 1e-12))
        return Y

    def project(self, X) -> np.ndarray:
        """``(n, d_in)`` embeddings -> ``(n, k)`` diagonalised coordinates ``u = (y - mu) @ V``."""
        self._need_fit()
        return (self.transform(X) - self.mu) @ self.V

    def _coefs(self) -> tuple[np.ndarray, np.ndarray, float]:
        psi = self.psi
        q = 1.0 / (1.0 + psi) - (1.0 + psi) / (1.0 + 2.0 * psi)
        p = psi / (1.0 + 2.0 * psi)
        c = 0.5 * float(np.sum(2.0 * np.log1p(psi) - np.log1p(2.0 * psi)))
        return q, p, c

    def score_projected(self, U1: np.ndarray, U2: np.ndarray) -> np.ndarray:
        """LLR of aligned rows of two ``(n, k)`` arrays from :meth:`project` -> ``(n,)``."""
        q, p, c = self._coefs()
        return 0.5 * ((U1 * U1 + U2 * U2) @ q) + (U1 * U2) @ p + c

    # ---- scoring --------------------------------------------------------------------------------
    def score(self, enroll, test, chunk: int = 1 << 16) -> np.ndarray:
        """LLR of row i of ``enroll`` vs row i of ``test``: ``(n, d_in), (n, d_in) -> (n,)`` float64.

        Processed ``chunk`` rows at a time, so memory stays bounded for millions of pairs.
        """
        self._need_fit()
        enroll = np.asarray(enroll)
        test = np.asarray(test)
        if enroll.ndim == 1:
            enroll = enroll[None]
        if test.ndim == 1:
            test = test[None]
        if enroll.shape[0] != test.shape[0]:
            raise BackendError(f"{enroll.shape[0]} enrolment rows but {test.shape[0]} test rows")
        out = np.empty(enroll.shape[0], dtype=np.float64)
        for s in range(0, enroll.shape[0], chunk):
            out[s:s + chunk] = self.score_projected(self.project(enroll[s:s + chunk]),
                                                    self.project(test[s:s + chunk]))
        return out

    def score_pairs(self, emb, idx_a, idx_b, chunk: int = 1 << 18) -> np.ndarray:
        """LLR of trials given by indices into one embedding table.

        emb: ``(n_utt, d_in)``; idx_a, idx_b: ``(n_trials,)`` integer row indices -> ``(n_trials,)``.
        Each embedding is pre-processed once, then trials are scored ``chunk`` at a time.
        """
        self._need_fit()
        U = self.project(emb)
        a = np.asarray(idx_a, dtype=np.int64).ravel()
        b = np.asarray(idx_b, dtype=np.int64).ravel()
        if a.shape != b.shape:
            raise BackendError(f"{a.size} enrolment indices but {b.size} test indices")
        out = np.empty(a.size, dtype=np.float64)
        for s in range(0, a.size, chunk):
            out[s:s + chunk] = self.score_projected(U[a[s:s + chunk]], U[b[s:s + chunk]])
        return out

    def score_matrix(self, A, B) -> np.ndarray:
        """LLR of every row of ``A`` ``(na, d_in)`` against every row of ``B`` ``(nb, d_in)`` -> ``(na, nb)``."""
        self._need_fit()
        q, p, c = self._coefs()
        Ua, Ub = self.project(A), self.project(B)
        return (0.5 * ((Ua * Ua) @ q))[:, None] + (0.5 * ((Ub * Ub) @ q))[None, :] + (Ua * p) @ Ub.T + c

    # ---- state ----------------------------------------------------------------------------------
    _STATE_ARRAYS = ("train_mean", "pre_matrix", "pre_offset", "mu", "between", "within", "V", "psi")

    def state(self) -> dict:
        """Plain dict: float64 arrays (``_STATE_ARRAYS``) and the numbers ``length_norm`` (0/1),
        ``lda_dim`` (0 = none), ``n_speakers``, ``n_utterances``."""
        self._need_fit()
        d = {k: np.array(getattr(self, k), dtype=np.float64) for k in self._STATE_ARRAYS}
        d.update(length_norm=int(self.length_norm), lda_dim=int(self.lda_dim),
                 n_speakers=int(self.n_speakers), n_utterances=int(self.n_utterances))
        return d

    @classmethod
    def from_state(cls, d: dict) -> "PLDA":
        """Rebuild a model from :meth:`state` (values may be 0-d arrays, as ``np.load`` returns them)."""
        p = cls()
        try:
            for k in cls._STATE_ARRAYS:
                setattr(p, k, np.array(d[k], dtype=np.float64))
            p.length_norm = bool(int(d["length_norm"]))
            p.lda_dim = int(d["lda_dim"])
            p.n_speakers = int(d.get("n_speakers", 0))
            p.n_utterances = int(d.get("n_utterances", 0))
        except KeyError as e:
            raise BackendError(f"PLDA state lacks {e}; the back-end file is incomplete, retrain it") from None
        d_in, k = p.pre_matrix.shape if p.pre_matrix.ndim == 2 else (-1, -1)
        shapes_ok = (k > 0 and p.pre_offset.shape == (k,) and p.mu.shape == (k,) and p.psi.shape == (k,)
                     and p.train_mean.shape == (d_in,)
                     and all(getattr(p, m).shape == (k, k) for m in ("between", "within", "V")))
        if not shapes_ok:
            raise BackendError("PLDA state has inconsistent array shapes; the back-end file is damaged, retrain it")
        return p


# --------------------------------------------------------------------------------------------------
# Back-end files
# --------------------------------------------------------------------------------------------------

def checkpoint_fingerprint(path) -> str:
    """Identity of a checkpoint file: 40-hex sha1 of its size, first MiB and last MiB (whole file if
    it is at most 2 MiB).

    Independent of the file's name, location and mtime (a copied or renamed checkpoint keeps its
    back-end), yet any retraining changes it: ``torch.save`` writes a zip archive whose central
    directory, at the end of the file, holds the CRC-32 of every tensor record, so the last MiB
    changes whenever any weight does. Reads at most 2 MiB, so it is cheap for large checkpoints.
    """
    path = Path(path)
    mib = 1 << 20
    try:
        size = path.stat().st_size
        h = hashlib.sha1(f"size={size};".encode())
        with open(path, "rb") as f:
            if size <= 2 * mib:
                h.update(f.read())
            else:
                h.update(f.read(mib))
                f.seek(size - mib)
                h.update(f.read(mib))
    except OSError as e:
        raise BackendError(f"cannot read checkpoint {path} to fingerprint it: {e.strerror or e}") from None
    return h.hexdigest()


def save_backend(path, plda: PLDA | None, calibrator: ScoreCalibrator | None, fingerprint: str,
                 extra: dict | None = None) -> None:
    """Atomically write a back-end file (``.npz``, no pickles).

    Arrays ``plda.<key>`` / ``cal.<key>`` hold the :meth:`PLDA.state` / :meth:`ScoreCalibrator.state`
    values; ``meta`` is a JSON string with the format marker, ``fingerprint`` (the checkpoint the
    embeddings came from, see :func:`checkpoint_fingerprint`) and ``extra`` (any JSON-serialisable
    dict: settings, speaker counts, calibration EER, ...).
    """
    try:
        meta = json.dumps({"format": BACKEND_FORMAT, "fingerprint": str(fingerprint), "extra": extra or {},
                           "has_plda": plda is not None, "has_calibrator": calibrator is not None})
    except TypeError as e:
        raise BackendError(f"back-end 'extra' must be JSON-serialisable: {e}") from None
    arrays = {"meta": np.array(meta)}
    if plda is not None:
        arrays.update({f"plda.{k}": np.asarray(v) for k, v in plda.state().items()})
    if calibrator is not None:
        arrays.update({f"cal.{k}": np.asarray(v) for k, v in calibrator.state().items()})

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, **arrays)

    atomic_write(Path(path), write)


def read_backend_meta(path) -> dict:
    """The JSON metadata of a back-end file: ``format``, ``fingerprint``, ``extra``, ``has_plda``,
    ``has_calibrator``. Raises :class:`BackendError` for a missing or unreadable file."""
    meta, _ = _read_npz(Path(path))
    return meta


def _read_npz(path: Path) -> tuple[dict, dict]:
    if not path.is_file():
        raise BackendError(f"back-end file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop("meta")))
    except Exception as e:  # zipfile.BadZipFile, ValueError, KeyError, OSError, JSONDecodeError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BackendError(f"{path} is not a readable back-end file ({first[:200]}); delete it or pass "
                           "--retrain_backend to rebuild it") from None
    if not isinstance(meta, dict) or meta.get("format") != BACKEND_FORMAT:
        raise BackendError(f"{path} is not a back-end file of this project (no '{BACKEND_FORMAT}' marker); "
                           "delete it or pass --retrain_backend")
    return meta, arrays


def load_backend(path, expected_fingerprint: str | None) -> tuple[PLDA | None, ScoreCalibrator | None, dict]:
    """Load a back-end file -> ``(plda or None, calibrator or None, extra dict)``.

    ``expected_fingerprint`` is the fingerprint of the checkpoint whose embeddings will be scored;
    a file saved for another checkpoint raises :class:`BackendError` (its embeddings live in a
    different space, so the back-end would be meaningless). ``None`` skips the check.
    """
    path = Path(path)
    meta, arrays = _read_npz(path)
    saved = meta.get("fingerprint")
    if expected_fingerprint is not None and saved != str(expected_fingerprint):
        raise BackendError(f"back-end {path} was trained on embeddings of checkpoint {saved}, but the "
                           f"current checkpoint is {expected_fingerprint}; retrain the back-end "
                           f"(delete {path.name} or pass --retrain_backend)")
    plda = cal = None
    if meta.get("has_plda"):
        plda = PLDA.from_state({k[5:]: v for k, v in arrays.items() if k.startswith("plda.")})
    if meta.get("has_calibrator"):
        cal = ScoreCalibrator.from_state({k[4:]: v for k, v in arrays.items() if k.startswith("cal.")})
    return plda, cal, dict(meta.get("extra") or {})
