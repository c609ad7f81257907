"""Trial scoring at scale: chunked cosine / back-end scoring, embedding centering, AS-norm.

Everything here is vectorised and works in fixed-size chunks, so a million trials over ten thousand
embeddings score in seconds with memory bounded by the chunk size (not by the number of trials).

AS-norm (adaptive symmetric score normalisation; Cumani et al. 2011, Matejka et al. 2017): every
embedding is scored against a *cohort* (here: the mean embedding of each training speaker); for an
embedding ``x`` let ``mu_x`` / ``sd_x`` be the mean and standard deviation of its ``top_n`` highest
cohort scores. A trial score ``s`` between ``e`` and ``t`` becomes

    s_norm = 0.5 * ((s - mu_e) / sd_e + (s - mu_t) / sd_t)

which removes per-utterance score offsets (e.g. a channel that makes one recording similar to
everything) and puts scores of different utterances on one scale.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 1 << 12          # trials per chunk: small enough for the gathered rows to stay in the CPU cache
SD_FLOOR = 1e-6


def length_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32)."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return F.normalize(t, dim=1).numpy()


def center(x: np.ndarray, mean: np.ndarray | None) -> np.ndarray:
    """``x - mean`` (float32); ``mean=None`` returns ``x`` unchanged."""
    x = np.asarray(x, dtype=np.float32)
    return x if mean is None else (x - np.asarray(mean, dtype=np.float32)[None, :])


def _indices(idx) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))


def cosine_scores(emb: np.ndarray, enroll_idx, test_idx, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """Cosine similarity of the embedding pairs ``(emb[enroll_idx[i]], emb[test_idx[i]])`` (float32).

    The embeddings are normalised once; the pairs are scored ``chunk`` at a time, so extra memory is
    ``2 * chunk * dim`` floats whatever the number of trials.
    """
    e = F.normalize(torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32)), dim=1)
    a, b = _indices(enroll_idx).ravel(), _indices(test_idx).ravel()
    if a.shape != b.shape:
        raise ValueError(f"{a.numel()} enrolment indices but {b.numel()} test indices")
    scores = torch.empty(a.numel(), dtype=torch.float32)
    with torch.no_grad():
        for s in range(0, a.numel(), chunk):
            scores[s:s + chunk] = (e[a[s:s + chunk]] * e[b[s:s + chunk]]).sum(dim=1)
    return scores.numpy()


class CosineScorer:
    """Cosine similarity back-end."""
    name = "cosine"

    def pairs(self, emb: np.ndarray, idx_a, idx_b, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
        return cosine_scores(emb, idx_a, idx_b, chunk)

    def matrix(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return length_normalize(a) @ length_normalize(b).T


class PLDAScorer:
    """PLDA log-likelihood-ratio back-end (wraps ``backend.PLDA``)."""
    name = "plda"

    def __init__(self, plda):
        self.plda = plda

    def pairs(self, emb: np.ndarray, idx_a, idx_b, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
        return self.plda.score_pairs(emb, idx_a, idx_b, chunk=max(chunk, 1)).astype(np.float32)

    def matrix(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self.plda.score_matrix(a, b).astype(np.float32)


def cohort_stats(x: np.ndarray, cohort: np.ndarray, top_n: int, scorer=None,
                 chunk: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """Per-row mean and standard deviation of the ``top_n`` highest cohort scores (AS-norm statistics).

    ``scorer`` is a back-end with ``matrix(A, B)`` (default: cosine). Rows of ``x`` are scored against
    the whole cohort in blocks of about ``chunk`` scores. ``top_n`` larger than the cohort uses the whole
    cohort. The standard deviation is the population one (ddof=0), floored at 1e-6 so that a constant
    cohort cannot divide by zero.
    """
    scorer = scorer or CosineScorer()
    x = np.asarray(x, dtype=np.float32)
    cohort = np.asarray(cohort, dtype=np.float32)
    if len(cohort) == 0:
        raise ValueError("AS-norm needs a non-empty cohort")
    k = max(1, min(int(top_n), len(cohort)))
    rows = max(1, chunk // len(cohort))
    cosine = isinstance(scorer, CosineScorer)
    if cosine:  # normalise once, then plain matrix products per block
        xt = torch.from_numpy(length_normalize(x))
        ct = torch.from_numpy(length_normalize(cohort)).T.contiguous()
    mu = np.empty(len(x), dtype=np.float64)
    sd = np.empty(len(x), dtype=np.float64)
    with torch.no_grad():
        for s in range(0, len(x), rows):
            if cosine:
                block = xt[s:s + rows] @ ct
            else:
                block = torch.from_numpy(np.asarray(scorer.matrix(x[s:s + rows], cohort), dtype=np.float32))
            top = torch.topk(block, k, dim=1, sorted=False).values.double()
            mu[s:s + rows] = top.mean(dim=1).numpy()
            sd[s:s + rows] = top.std(dim=1, unbiased=False).clamp_min(SD_FLOOR).numpy()
    return mu, sd


def asnorm(scores, enroll_idx, test_idx, mu: np.ndarray, sd: np.ndarray,
           mu_test: np.ndarray | None = None, sd_test: np.ndarray | None = None) -> np.ndarray:
    """Adaptive symmetric normalisation of trial scores, vectorised (float32).

    ``mu``/``sd`` are the cohort statistics of the embeddings ``enroll_idx`` points into (and of
    those ``test_idx`` points into, unless ``mu_test``/``sd_test`` are given separately).
    """
    s = np.asarray(scores, dtype=np.float64)
    a = np.asarray(enroll_idx, dtype=np.int64)
    b = np.asarray(test_idx, dtype=np.int64)
    mu_t = mu if mu_test is None else mu_test
    sd_t = sd if sd_test is None else sd_test
    return (0.5 * ((s - mu[a]) / sd[a] + (s - mu_t[b]) / sd_t[b])).astype(np.float32)


def speaker_means(emb: np.ndarray, speakers, normalize: bool = True) -> tuple[np.ndarray, list[str]]:
    """Mean embedding per speaker (of length-normalised embeddings when ``normalize``), sorted by name."""
    x = length_normalize(emb) if normalize else np.asarray(emb, dtype=np.float32)
    speakers = np.asarray(list(speakers))
    names = sorted(set(speakers.tolist()))
    lookup = {s: i for i, s in enumerate(names)}
    ids = np.array([lookup[s] for s in speakers.tolist()], dtype=np.int64)
    sums = np.zeros((len(names), x.shape[1]), dtype=np.float64)
    np.add.at(sums, ids, x)
    counts = np.bincount(ids, minlength=len(names)).astype(np.float64)
    return (sums / counts[:, None]).astype(np.float32), names
