"""Offline text corpora: Debian's WordNet and GCIDE dictionaries plus gensim's test corpora (no network)."""

from .offline import (
    APT_COMMAND,
    gensim_test_data,
    mini_newsgroup,
    offline_corpus,
    offline_documents,
    tokenize,
)

__all__ = ["APT_COMMAND", "gensim_test_data", "mini_newsgroup", "offline_corpus", "offline_documents", "tokenize"]
