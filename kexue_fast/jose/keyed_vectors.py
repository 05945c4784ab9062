"""Word (or document) vectors with gensim ``KeyedVectors``' interface and the word2vec text / binary file formats.

The word2vec format (Mikolov's word2vec.c, read and written by gensim): a header line "V D", then per key either
"key x_1 … x_D" (text) or "key " followed by D little-endian float32 (binary, a newline after each vector).
"""

from __future__ import annotations

import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .vocab import word_bytes

Key = Union[str, int]


class KeyedVectors:
    """Vectors [V, D] (float32) with their keys; ``kv["word"]``, ``"word" in kv``, ``kv.most_similar("word")``."""

    def __init__(self, keys: Sequence[Key], vectors: np.ndarray) -> None:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(keys):
            raise ValueError(f"vectors must be [len(keys), D]; got {vectors.shape} for {len(keys)} keys")
        self.index_to_key: List[Key] = list(keys)
        self.key_to_index: Dict[Key, int] = {k: i for i, k in enumerate(self.index_to_key)}
        if len(self.key_to_index) != len(self.index_to_key):
            raise ValueError("keys must be unique")
        self.vectors = vectors
        self._normed: Optional[np.ndarray] = None

    @property
    def vector_size(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.index_to_key)

    def __contains__(self, key: Key) -> bool:
        return key in self.key_to_index

    def get_index(self, key: Key) -> int:
        """The row of `key`; an int that is not a key is a row index itself (as gensim's)."""
        index = self.key_to_index.get(key)
        if index is not None:
            return index
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool) and 0 <= key < len(self):
            return int(key)
        raise KeyError(f"key {key!r} not present")

    def __getitem__(self, key: Union[Key, Iterable[Key]]) -> np.ndarray:
        if isinstance(key, (str, int, np.integer)):
            return self.vectors[self.get_index(key)]
        return np.stack([self.vectors[self.get_index(k)] for k in key])

    def get_vector(self, key: Key, norm: bool = False) -> np.ndarray:
        return self.normed_vectors()[self.get_index(key)] if norm else self.vectors[self.get_index(key)]

    def normed_vectors(self) -> np.ndarray:
        """Rows scaled to unit length (cached; recomputed after ``vectors`` is replaced by ``fill_norms(force)``)."""
        if self._normed is None or self._normed.shape != self.vectors.shape:
            # in float64: float32 squares overflow past ~1e19 (the row's cosine then 0) and underflow below ~1e-23
            wide = self.vectors.astype(np.float64)
            norms = np.linalg.norm(wide, axis=1, keepdims=True)
            self._normed = (wide / np.maximum(norms, np.finfo(np.float64).tiny)).astype(self.vectors.dtype)
        return self._normed

    def fill_norms(self, force: bool = False) -> None:
        if force:
            self._normed = None
        self.normed_vectors()

    def similarity(self, a: Key, b: Key) -> float:
        """cos(x_a, x_b)."""
        n = self.normed_vectors()
        return float(n[self.get_index(a)] @ n[self.get_index(b)])

    def most_similar(
        self,
        positive: Union[Key, np.ndarray, Sequence[Union[Key, np.ndarray]], None] = None,
        negative: Union[Key, np.ndarray, Sequence[Union[Key, np.ndarray]], None] = None,
        topn: Optional[int] = 10,
    ) -> Union[List[Tuple[Key, float]], np.ndarray]:
        """The topn keys by cosine with mean(unit(positive)) − mean-weighted unit(negative) (gensim's rule: weights
        +1 / −1, the mean of the unit vectors, keys given as input excluded); topn=None: every key's cosine, in row
        order (an array, the input keys included, as gensim returns)."""
        if topn is not None and (isinstance(topn, bool) or not isinstance(topn, (int, np.integer)) or topn < 1):
            raise ValueError(f"topn must be an int >= 1 or None; got {topn!r}")

        def as_list(x):
            if x is None:
                return []
            if isinstance(x, (str, int, np.integer, np.ndarray)):
                return [x]
            return list(x)

        pos, neg = as_list(positive), as_list(negative)
        if not pos and not neg:
            raise ValueError("most_similar needs at least one positive or negative key or vector")
        normed = self.normed_vectors()
        parts, exclude = [], set()
        for weight, items in ((1.0, pos), (-1.0, neg)):
            for item in items:
                if isinstance(item, np.ndarray):
                    if item.shape != (self.vector_size,):
                        raise ValueError(f"a vector argument must have shape ({self.vector_size},); got {item.shape}")
                    parts.append(weight * item / max(float(np.linalg.norm(item)), 1e-30))
                else:
                    i = self.get_index(item)
                    exclude.add(i)
                    parts.append(weight * normed[i])
        query = np.mean(parts, axis=0)
        query = query / max(float(np.linalg.norm(query)), 1e-30)
        scores = normed @ query.astype(np.float32)
        if topn is None:
            return scores
        if exclude:
            scores[list(exclude)] = -np.inf
        count = min(topn, len(self) - len(exclude))
        if count <= 0:
            return []
        best = np.argpartition(-scores, count - 1)[:count]
        best = best[np.argsort(-scores[best], kind="stable")]
        return [(self.index_to_key[i], float(scores[i])) for i in best]

    def save_word2vec_format(self, path: Union[str, os.PathLike], binary: bool = False) -> None:
        """Write the word2vec text (binary=False) or binary format, readable by gensim's ``load_word2vec_format``."""
        keys = [str(k) for k in self.index_to_key]
        for k in keys:
            if not k or any(c in k for c in " \t\n"):
                raise ValueError(f"key {k!r} cannot be written in word2vec format (empty or contains whitespace)")
        vectors = np.ascontiguousarray(self.vectors, dtype="<f4")
        with open(path, "wb") as f:
            f.write(f"{len(keys)} {self.vector_size}\n".encode())
            if binary:
                for k, row in zip(keys, vectors):
                    f.write(word_bytes(k) + b" " + row.tobytes() + b"\n")
            else:
                for k, row in zip(keys, vectors):
                    f.write(word_bytes(k) + (" " + " ".join(repr(float(x)) for x in row) + "\n").encode())

    @classmethod
    def load_word2vec_format(cls, path: Union[str, os.PathLike], binary: bool = False) -> KeyedVectors:
        """Read the word2vec text or binary format (as written by word2vec.c, gensim or ``save_word2vec_format``).
        Words that are not UTF-8 keep their bytes as surrogateescape's U+DC80..U+DCFF (written back as they were)."""
        with open(path, "rb") as f:
            header = f.readline().split()
            if len(header) != 2:
                raise ValueError(f"{path}: the first line must be 'V D'")
            count, dim = int(header[0]), int(header[1])
            keys: List[str] = []
            vectors = np.empty((count, dim), dtype=np.float32)
            if binary:
                for i in range(count):
                    word = bytearray()
                    while True:
                        ch = f.read(1)
                        if not ch:
                            raise ValueError(f"{path}: file ends after {i} of {count} vectors")
                        if ch == b" ":
                            break
                        if ch != b"\n" or word:
                            word += ch
                    keys.append(word.decode("utf-8", "surrogateescape"))
                    raw = f.read(4 * dim)
                    if len(raw) != 4 * dim:
                        raise ValueError(f"{path}: file ends inside vector {i}")
                    vectors[i] = np.frombuffer(raw, dtype="<f4")
            else:
                for i in range(count):
                    parts = f.readline().decode("utf-8", "surrogateescape").rstrip("\n").rstrip().split(" ")
                    if len(parts) != dim + 1:
                        raise ValueError(f"{path}: line {i + 2} has {len(parts) - 1} values, expected {dim}")
                    keys.append(parts[0])
                    vectors[i] = np.asarray(parts[1:], dtype=np.float32)
        return cls(keys, vectors)
