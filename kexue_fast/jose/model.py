"""The JoSE model: vocabulary, tables, training on the chosen backend, and the vector views."""

from __future__ import annotations

import json
import os
import time
import warnings
import zlib
from typing import Iterable, List, Optional, Sequence, Union

import numpy as np
import torch

from .. import _dispatch
from .keyed_vectors import KeyedVectors
from .reference import STEP_RULES
from .vocab import EOS, Corpus, EncodedCorpus, core, encode, encode_with

OP = "jose_train"
_dispatch.register_op(OP, {"cpp": (torch.float32,), "triton": (torch.float32,), "torch": (torch.float32,)})


_INT32_MAX = 2**31 - 1  # the C++ trainer's int arguments
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _check_int(name: str, value, low: int, high: int = _INT32_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}]; got {value}")
    return int(value)


def _check_float(name: str, value, positive: bool) -> float:
    """A finite float ≥ 0 (> 0 if positive) within float32's normal range: the trainers compute in float32, where
    1e39 became inf (and the tables NaN) and a value below the smallest normal rounds to 0 or a subnormal."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a float; got {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'} and finite; got {value}")
    if value > _FLOAT32_MAX or (value != 0 and value < float(np.finfo(np.float32).tiny)):
        rng = "[1.2e-38, 3.4e38]" if positive else "[1.2e-38, 3.4e38] or be 0"
        raise ValueError(f"{name} must lie in float32's normal range {rng}; got {value}")
    return value


_ALPHA_MAX = 1e6  # steps of α·∇ in float32: α = 1e20 turned rows NaN or 0 on every backend (1e19 still ran)


def _check_alpha(alpha) -> float:
    """The learning rate: > 0, at most 1e6 (beyond, float32 steps overflow into NaN tables long before any use)."""
    value = _check_float("alpha", alpha, positive=True)
    if value > _ALPHA_MAX:
        raise ValueError(f"alpha must be at most {_ALPHA_MAX:g} (a learning rate; larger steps overflow float32 "
                         f"into NaN tables); got {value:g}")  # fmt: skip
    return value


def _check_deterministic(chosen: str, workers: int) -> None:
    """torch.use_deterministic_algorithms(True): an error (a warning with warn_only=True), as torch's own ops give, for
    the trainers whose results depend on timing: the C++ Hogwild trainer with workers > 1 and the Triton trainer
    (float atomic adds)."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    if chosen == "cpp" and workers > 1:
        what = f"JoSE's C++ trainer with workers={workers} (Hogwild: threads update the tables without locks)"
    elif chosen == "triton":
        what = "JoSE's Triton trainer (its updates are float atomic adds, summed in any order)"
    else:
        return
    message = (
        f"{what} does not have a deterministic implementation, but you set 'torch.use_deterministic_algorithms(True)': "
        "pass workers=1 with device='cpu' (bit-reproducible)"
    )
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, UserWarning, stacklevel=3)
    else:
        raise RuntimeError(message)


class JoSE:
    """Spherical text embedding (Meng et al., "Spherical Text Embedding", NeurIPS 2019).

    Word vectors u (``wv``), context vectors v (``cv``) and document vectors d (``dv``, one per document) on the
    unit sphere, trained by Riemannian SGD on the hinges of ``kexue_fast.jose.reference`` (formulas there):
    ``joint_hinge=False`` trains the official code's two hinges max(0, m − uᵀv + u'ᵀv) and max(0, m − uᵀd + u'ᵀd),
    ``True`` the paper's max(0, m − uᵀv − uᵀd + u'ᵀv + u'ᵀd); ``step_rule="paper"`` scales each tangential step by
    1 + xᵀ∇/‖∇‖, ``"jose_c"`` uses the official code's factors (1 − f, 2h, 1 − (f − h)).

    Backends: ``device="cpu"`` runs the C++ Hogwild trainer (csrc/jose; ``workers=1`` is deterministic: the same
    seed gives bit-identical tables), ``device="cuda"`` the Triton mini-batch trainer; ``backend="torch"`` the
    mini-batch trainer in plain torch on either device. The numeric defaults are the official code's (dim, window,
    negative, margin, alpha, sample, min_count, epochs); ``step_rule`` defaults to the paper's rule.

    The learning rate decays linearly with the words processed: the C++ trainer recomputes it every 10,000 words
    per worker, as jose.c does, so a corpus of fewer words than that (times epochs) trains at the full ``alpha``;
    the mini-batch trainers per batch. ``workers`` defaults to every core (Hogwild: not bit-reproducible; pass
    ``workers=1`` for that). With ``joint_hinge=True`` a document needs a context pair to move: one-token documents
    keep their random initial vectors (``dv`` and ``infer_vectors``); the separate hinges train them.
    """

    def __init__(
        self,
        dim: int = 100,
        window: int = 5,
        negative: int = 2,
        margin: float = 0.15,
        alpha: float = 0.04,
        sample: float = 1e-3,
        min_count: int = 5,
        epochs: int = 10,
        workers: Optional[int] = None,
        step_rule: str = "paper",
        joint_hinge: bool = False,
        seed: int = 0,
        device: str = "cpu",
        backend: Optional[str] = None,
        batch_size: int = 16384,
        progress: bool = True,
    ) -> None:
        self.dim = _check_int("dim", dim, 1)
        self.window = _check_int("window", window, 1)
        self.negative = _check_int("negative", negative, 1)
        self.margin = _check_float("margin", margin, positive=True)
        self.alpha = _check_alpha(alpha)
        self.sample = _check_float("sample", sample, positive=False)
        self.min_count = _check_int("min_count", min_count, 1, 2**63 - 1)
        self.epochs = _check_int("epochs", epochs, 1)
        self.workers = (os.cpu_count() or 1) if workers is None else _check_int("workers", workers, 1)
        if step_rule not in STEP_RULES:
            raise ValueError(f"step_rule must be one of {STEP_RULES}; got {step_rule!r}")
        self.step_rule = step_rule
        if not isinstance(joint_hinge, bool):
            raise TypeError(f"joint_hinge must be a bool; got {type(joint_hinge).__name__}")
        self.joint_hinge = joint_hinge
        self.seed = _check_int("seed", seed, 0, 2**64 - 1)
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must be 'cpu' or 'cuda[:i]'; got {device!r}") from exc
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:i]'; got {device!r}")
        if backend is not None:
            _dispatch.requested_backend(backend)  # a bad name raises here, not at fit()
        self.backend = backend
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.progress = bool(progress)
        self.words: List[str] = []
        self.counts: Optional[np.ndarray] = None
        self._u: Optional[np.ndarray] = None
        self._v: Optional[np.ndarray] = None
        self._d: Optional[np.ndarray] = None
        self.loss_: Optional[float] = None
        self.train_seconds_: Optional[float] = None
        self.backend_: Optional[str] = None
        self._views: dict = {}

    # ---------------------------------------------------------------------------------------------- training
    def fit(self, corpus: Corpus) -> JoSE:
        """Train on ``corpus``: a path to a text file (one whitespace-tokenized document per line) or an iterable of
        token lists (one per document). Returns self."""
        chosen = _dispatch.choose(OP, self.device, torch.float32, self.backend)
        _check_deterministic(chosen, self.workers)
        encoded = encode(corpus, self.min_count)
        if encoded.raw_tokens == 0:
            raise ValueError("corpus is empty: it holds no tokens")
        if len(encoded.words) < 2:
            raise ValueError(
                f"no word occurs at least min_count={self.min_count} times in the corpus "
                f"({encoded.raw_tokens} tokens); lower min_count or give more text"
            )
        self.words, self.counts = encoded.words, encoded.counts
        self._views = {}
        self._u, self._v, self._d = self._initial_tables(len(encoded.words), encoded.n_docs)
        start = time.perf_counter()
        self.loss_ = self._train(chosen, encoded, self._u, self._v, self._d, update_words=True, epochs=self.epochs,
                                 alpha=self.alpha, seed=self.seed, workers=self.workers)  # fmt: skip
        self.train_seconds_ = time.perf_counter() - start
        self.backend_ = chosen
        self.n_tokens_ = len(encoded.stream)
        return self

    def _initial_tables(self, vocab: int, docs: int):
        _core = core()

        u = np.empty((vocab, self.dim), dtype=np.float32)
        v = np.empty((vocab, self.dim), dtype=np.float32)
        d = np.empty((docs, self.dim), dtype=np.float32)
        _core.jose_init_tables(u, v, d, self.seed)
        return u, v, d

    def _train(self, chosen: str, enc: EncodedCorpus, u, v, d, update_words: bool, epochs: int, alpha: float,
               seed: int, workers: int, show: Optional[bool] = None, decay: bool = True) -> float:  # fmt: skip
        total = epochs * len(enc.stream)
        bar = None
        if self.progress if show is None else show:
            try:
                from tqdm.auto import tqdm

                bar = tqdm(total=total, unit="w", unit_scale=True, desc=f"JoSE ({chosen})", leave=False)
            except ImportError:
                bar = None

        def report(done: int) -> None:
            if bar is not None:
                bar.update(min(done, total) - bar.n)

        try:
            if chosen == "cpp":
                from .. import _core

                loss, _, _ = _core.jose_train(
                    enc.stream, enc.counts, enc.n_docs, u, v, d, window=self.window, negative=self.negative,
                    epochs=epochs, threads=workers, margin=self.margin, alpha=alpha, sample=self.sample,
                    step_rule=STEP_RULES.index(self.step_rule), joint=self.joint_hinge, update_words=update_words,
                    seed=seed, progress=report if bar is not None else None, decay=decay,
                )  # fmt: skip
                return float(loss)
            from .batched import train_batched

            return train_batched(
                enc, u, v, d, window=self.window, negative=self.negative, epochs=epochs, margin=self.margin,
                alpha=alpha, sample=self.sample, step_rule=self.step_rule, joint=self.joint_hinge,
                update_words=update_words, seed=seed, device=self.device, batch_size=self.batch_size,
                use_triton=chosen == "triton", progress=report, decay=decay,
            )  # fmt: skip
        finally:
            if bar is not None:
                bar.close()

    # ------------------------------------------------------------------------------------------------ views
    def _require_fit(self) -> None:
        if self._u is None:
            raise RuntimeError("the model is not trained yet: call fit(corpus) first")

    def _view(self, name: str, keys, table, first: int) -> KeyedVectors:
        """A KeyedVectors over rows first: of the table (no copy: it shows later training), built once per fit."""
        self._require_fit()
        if name not in self._views:
            self._views[name] = KeyedVectors(list(range(table.shape[0])) if keys is None else keys, table[first:])
        return self._views[name]

    @property
    def wv(self) -> KeyedVectors:
        """Word (centre) vectors u, the vocabulary without "</s>" (jose.c's word table)."""
        return self._view("wv", self.words[1:], self._u, 1)

    @property
    def cv(self) -> KeyedVectors:
        """Context vectors v (jose.c's context table)."""
        return self._view("cv", self.words[1:], self._v, 1)

    @property
    def dv(self) -> KeyedVectors:
        """Document vectors d, keyed by the document's index in the training corpus."""
        return self._view("dv", None, self._d, 0)

    def most_similar(self, positive=None, negative=None, topn: int = 10):
        """``wv.most_similar``."""
        return self.wv.most_similar(positive, negative, topn)

    # -------------------------------------------------------------------------------------------- inference
    def infer_vectors(self, docs: Iterable[Sequence[str]], epochs: Optional[int] = None,
                      alpha: Optional[float] = None, seed: Optional[int] = None) -> np.ndarray:  # fmt: skip
        """Document vectors [N, D] for new token lists: u and v frozen, each d started at a random unit vector and
        moved on the sphere by the same hinge(s) for ``epochs`` passes. Unknown tokens are ignored (a document with
        no known token keeps its starting vector); a token that is not a str is a TypeError. The learning rate stays
        at ``alpha`` (a decay over the batch would train its first documents more than its last) and each starting
        vector is drawn from ``seed`` and the document's tokens (as gensim seeds by content), so a document's vector
        does not depend systematically on the batch or its place in it; but one random stream runs over the whole
        batch, so the sub-sampling and the negatives a document gets, and so its vector, differ between a call on it
        alone and one in a batch (as between two seeds)."""
        self._require_fit()
        epochs = self.epochs if epochs is None else _check_int("epochs", epochs, 1)
        alpha = self.alpha if alpha is None else _check_alpha(alpha)
        seed = self.seed if seed is None else _check_int("seed", seed, 0, 2**64 - 1)
        if isinstance(docs, (str, bytes)):
            raise TypeError("docs must be an iterable of token lists")
        docs = list(docs)
        stream = encode_with(self.words, docs)
        n_docs = len(docs)
        if n_docs == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        d = np.empty((n_docs, self.dim), dtype=np.float32)
        for i, doc in enumerate(docs):
            text = "\u241f".join(t for t in doc if isinstance(t, str)).encode("utf-8", "surrogatepass")
            d[i] = np.random.default_rng([seed, zlib.crc32(text)]).standard_normal(self.dim)
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        if len(stream) > n_docs:
            enc = EncodedCorpus(self.words, self.counts, stream, n_docs, int(len(stream) - n_docs))
            chosen = _dispatch.choose(OP, self.device, torch.float32, self.backend)
            self._train(chosen, enc, self._u, self._v, d, update_words=False, epochs=epochs, alpha=alpha, seed=seed,
                        workers=1, show=False, decay=False)  # fmt: skip
        return d

    def infer_vector(self, tokens: Sequence[str], epochs: Optional[int] = None, alpha: Optional[float] = None,
                     seed: Optional[int] = None) -> np.ndarray:  # fmt: skip
        """One document vector [D] (see ``infer_vectors``)."""
        if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence):
            raise TypeError(f"tokens must be a list of str; got {type(tokens).__name__}")
        return self.infer_vectors([tokens], epochs=epochs, alpha=alpha, seed=seed)[0]

    # ---------------------------------------------------------------------------------------------- persistence
    _PARAMS = ("dim", "window", "negative", "margin", "alpha", "sample", "min_count", "epochs", "workers", "step_rule",
               "joint_hinge", "seed", "batch_size")  # fmt: skip

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the hyper-parameters, vocabulary and the three tables to one .npz archive at exactly `path` (no
        suffix added: ``JoSE.load(path)`` reads it back)."""
        self._require_fit()
        params = {k: getattr(self, k) for k in self._PARAMS}
        # the words as their bytes back to back with offsets (a fixed-width string array would pad every word to the
        # longest one at 4 bytes a character); surrogatepass keeps any str, a file's undecodable bytes included
        raw = [w.encode("utf-8", "surrogatepass") for w in self.words]
        offsets = np.cumsum([0] + [len(b) for b in raw], dtype=np.int64)
        word_bytes = np.frombuffer(b"".join(raw), dtype=np.uint8)
        with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a name without it
            np.savez(f, params=np.array(json.dumps(params)), word_bytes=word_bytes, word_offsets=offsets,
                     counts=self.counts, u=self._u, v=self._v, d=self._d)  # fmt: skip

    @classmethod
    def load(cls, path: Union[str, os.PathLike], device: str = "cpu", backend: Optional[str] = None) -> JoSE:
        """A model written by ``save`` (at `path`, or at `path` + ".npz", where np.savez put earlier saves)."""
        if not os.path.exists(path) and os.path.exists(os.fspath(path) + ".npz"):
            path = os.fspath(path) + ".npz"
        with np.load(path, allow_pickle=False) as f:
            model = cls(**json.loads(str(f["params"])), device=device, backend=backend, progress=False)
            if "word_bytes" in f:
                raw, offsets = f["word_bytes"].tobytes(), f["word_offsets"].tolist()
                model.words = [raw[a:b].decode("utf-8", "surrogatepass") for a, b in zip(offsets[:-1], offsets[1:])]
            else:  # written before the byte layout: a numpy string array
                model.words = [str(w) for w in f["words"]]
            model.counts = f["counts"]
            model._u, model._v, model._d = (np.ascontiguousarray(f[k], dtype=np.float32) for k in ("u", "v", "d"))
        return model

    def __repr__(self) -> str:
        state = f"vocab={len(self.words) - 1}, docs={self._d.shape[0]}" if self._u is not None else "untrained"
        return (f"JoSE(dim={self.dim}, window={self.window}, negative={self.negative}, margin={self.margin}, "
                f"step_rule={self.step_rule!r}, joint_hinge={self.joint_hinge}, {state})")  # fmt: skip


__all__ = ["EOS", "JoSE"]
