"""The vocabulary and id stream of a corpus, with jose.c's conventions.

Vocabulary: "</s>" first (its count is the number of documents), then the words with count ≥ min_count by count
descending, ties by their UTF-8 bytes descending (jose.c's qsort order). Stream: the word ids of every document
(words below min_count dropped) each followed by 0.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Sequence, Union

import numpy as np

EOS = "</s>"
Corpus = Union[str, os.PathLike, Iterable[Sequence[str]]]


@dataclass
class EncodedCorpus:
    words: List[str]  # id → word, words[0] == "</s>"
    counts: np.ndarray  # int64 [V]
    stream: np.ndarray  # int32 [n_tokens + n_docs]
    n_docs: int
    raw_tokens: int  # tokens before min_count


def word_bytes(word: str) -> bytes:
    """A word's bytes as a file holds them: UTF-8, with a file's undecodable bytes (read as surrogateescape's
    U+DC80..U+DCFF) given back as they were; any other lone surrogate by surrogatepass."""
    try:
        return word.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return word.encode("utf-8", "surrogatepass")


def _sorted_vocab(counter: Counter, n_docs: int, min_count: int):
    kept = [(w, c) for w, c in counter.items() if c >= min_count]
    # count descending, then bytes descending (jose.c's strcmp-based order)
    kept.sort(key=lambda wc: (wc[1], word_bytes(wc[0])), reverse=True)
    words = [EOS] + [w for w, _ in kept]
    counts = np.array([n_docs] + [c for _, c in kept], dtype=np.int64)
    return words, counts


def encode_documents(docs: Iterable[Sequence[str]], min_count: int) -> EncodedCorpus:
    """Encode an iterable of token lists (read once; it is materialized)."""
    if isinstance(docs, (str, bytes)):
        raise TypeError("corpus must be a path to a text file or an iterable of token lists; got a str or bytes")
    materialized: List[Sequence[str]] = []
    counter: Counter = Counter()
    for i, doc in enumerate(docs):
        if isinstance(doc, (str, bytes)) or not isinstance(doc, Sequence):
            raise TypeError(f"corpus[{i}] must be a list of str tokens; got {type(doc).__name__}")
        for tok in doc:
            if not isinstance(tok, str):
                raise TypeError(f"corpus[{i}] holds a {type(tok).__name__} token; tokens must be str")
        counter.update(doc)
        materialized.append(doc)
    if EOS in counter:
        raise ValueError(f"the token {EOS!r} is reserved for the end of a document")
    words, counts = _sorted_vocab(counter, len(materialized), min_count)
    index = {w: i for i, w in enumerate(words)}
    ids: List[int] = []
    for doc in materialized:
        ids.extend(index[t] for t in doc if t in index)
        ids.append(0)
    stream = np.asarray(ids, dtype=np.int32)
    return EncodedCorpus(words, counts, stream, len(materialized), sum(counter.values()))


def core():
    """kexue_fast._core, which JoSE needs on every backend (the file reader and jose.c's initial tables)."""
    from .. import _dispatch

    return _dispatch.require_core(
        "JoSE needs the C++ extension kexue_fast._core on every backend (its corpus reader and jose.c's initial tables)"
    )


def encode_file(path: Union[str, os.PathLike], min_count: int) -> EncodedCorpus:
    """Encode a whitespace-tokenized file, one document per line (C++ reader)."""
    _core = core()

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"corpus path {str(p)!r} is not a file")
    words, counts, stream, n_docs, raw = _core.jose_encode_file(str(p), int(min_count))
    # bytes that are not UTF-8 (a Latin-1 file, say) are kept as surrogateescape's code points, as jose.c keeps bytes
    return EncodedCorpus([w.decode("utf-8", "surrogateescape") for w in words], counts, stream, int(n_docs), int(raw))


def encode(corpus: Corpus, min_count: int) -> EncodedCorpus:
    if isinstance(corpus, (str, os.PathLike)):
        return encode_file(corpus, min_count)
    return encode_documents(corpus, min_count)


def encode_with(words: Sequence[str], docs: Iterable[Sequence[str]]) -> np.ndarray:
    """The stream of documents over an existing vocabulary (unknown tokens dropped; TypeError for a non-str one), for
    inference."""
    index = {w: i for i, w in enumerate(words)}
    ids: List[int] = []
    for i, doc in enumerate(docs):
        if isinstance(doc, (str, bytes)) or not isinstance(doc, Sequence):
            raise TypeError(f"document {i} must be a list of str tokens; got {type(doc).__name__}")
        for tok in doc:  # as encode_documents: a token id or bytes would otherwise be dropped silently as unknown
            if not isinstance(tok, str):
                raise TypeError(f"document {i} holds a {type(tok).__name__} token; tokens must be str")
        ids.extend(index[t] for t in doc if t in index and t != EOS)
        ids.append(0)
    return np.asarray(ids, dtype=np.int32)
