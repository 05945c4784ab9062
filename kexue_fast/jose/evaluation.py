"""Word-similarity evaluation against human judgements (WordSim-353, SimLex-999 from the gensim wheel's test data).

ρ = Spearman correlation between the human scores and cos(x_a, x_b) over the pairs whose both words are in the
vocabulary (case-insensitive: the most frequent key of each lower-cased form), as gensim's ``evaluate_word_pairs``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, NamedTuple, Tuple, Union

import numpy as np

from ..datasets.offline import gensim_test_data
from .keyed_vectors import KeyedVectors

DATASETS = {"wordsim353": "wordsim353.tsv", "simlex999": "simlex999.txt"}


class SimilarityResult(NamedTuple):
    spearman: float
    pearson: float
    pairs: int  # pairs scored
    oov_ratio: float  # share of pairs skipped (a word out of the vocabulary)


def dataset_path(dataset: str) -> Path:
    """The file of a named dataset in gensim's test data (FileNotFoundError naming the install when missing)."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)} or a path to a 'word1<TAB>word2<TAB>score' file;"
                         f" got {dataset!r}")  # fmt: skip
    root = gensim_test_data()
    if root is None or not (root / DATASETS[dataset]).is_file():
        raise FileNotFoundError(f"{dataset} ships with gensim's test data: pip install gensim (or 'kexue-fast[jose]')")
    return root / DATASETS[dataset]


def read_pairs(path: Union[str, os.PathLike]) -> List[Tuple[str, str, float]]:
    pairs = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        a, b, score = line.split("\t")[:3]
        pairs.append((a, b, float(score)))
    return pairs


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank), as scipy.stats.rankdata."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1
        i = j + 1
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / np.sqrt((a @ a) * (b @ b)))


def evaluate_word_similarity(wv: KeyedVectors, dataset: str = "wordsim353", case_insensitive: bool = True
                             ) -> SimilarityResult:  # fmt: skip
    """Spearman ρ (and Pearson r) of cosine similarities against the human scores of ``dataset``
    ("wordsim353", "simlex999", or a path to a tab-separated 'word1 word2 score' file)."""
    if not hasattr(wv, "index_to_key") or not hasattr(wv, "vectors"):
        raise TypeError(f"wv must be KeyedVectors (e.g. model.wv); got {type(wv).__name__}")
    path = Path(dataset) if dataset not in DATASETS and Path(str(dataset)).is_file() else dataset_path(dataset)
    pairs = read_pairs(path)
    if case_insensitive:
        lookup = {}
        for i in range(len(wv.index_to_key) - 1, -1, -1):  # the most frequent (lowest index) wins
            lookup[str(wv.index_to_key[i]).lower()] = i
    else:
        lookup = {str(k): i for i, k in enumerate(wv.index_to_key)}
    vectors = np.asarray(wv.vectors, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1)
    human, model = [], []
    for a, b, score in pairs:
        key_a, key_b = (a.lower(), b.lower()) if case_insensitive else (a, b)
        if key_a not in lookup or key_b not in lookup:
            continue
        i, j = lookup[key_a], lookup[key_b]
        human.append(score)
        model.append(float(vectors[i] @ vectors[j] / max(norms[i] * norms[j], 1e-300)))
    if len(human) < 3:
        raise ValueError(f"only {len(human)} of {len(pairs)} pairs of {dataset} are in the vocabulary")
    h, m = np.asarray(human), np.asarray(model)
    return SimilarityResult(_pearson(_ranks(h), _ranks(m)), _pearson(h, m), len(human), 1 - len(human) / len(pairs))
