"""JoSE: spherical text embeddings (Meng et al., NeurIPS 2019; kexue.fm "JoSE:球面上的词向量和句向量").

Word, context and document vectors on the unit sphere trained by Riemannian SGD on cosine hinges (formulas in
``reference``): a C++ Hogwild trainer (csrc/jose, the official jose.c's algorithm and RNG conventions), a Triton
mini-batch trainer for CUDA (kernels/jose.py), word-similarity evaluation and doc-vector helpers.
"""

from . import reference
from .docs import KMeansResult, knn_predict, spherical_kmeans
from .evaluation import SimilarityResult, evaluate_word_similarity
from .keyed_vectors import KeyedVectors
from .model import JoSE

__all__ = [
    "JoSE",
    "KMeansResult",
    "KeyedVectors",
    "SimilarityResult",
    "evaluate_word_similarity",
    "knn_predict",
    "reference",
    "spherical_kmeans",
]
