"""A training corpus built from local files only.

Sources (each used when present):
  gcide    Debian's ``dict-gcide`` (/usr/share/dictd/gcide.dict.dz): one document per dictionary entry
  wordnet  Debian's ``wordnet-base`` (/usr/share/wordnet/data.*): one document per synset (lemmas + gloss)
  gensim   the corpora shipped in the gensim wheel's test data (lee_background, lee, pang_lee_polarity, ...)
Install the Debian packages with ``apt-get install -y wordnet-base dict-gcide``; gensim with
``pip install 'kexue-fast[jose]'`` (or ``pip install gensim``).

Text is lower-cased and tokenized into runs of ASCII letters (with inner apostrophes; other characters split);
GCIDE's source markers ("[1913 Webster]") and pronunciation fields (backslash-delimited) are dropped.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import pickle
import re
import tempfile
import zlib
from pathlib import Path
from typing import ClassVar, Dict, Iterator, List, Optional, Sequence, Tuple, Union

APT_COMMAND = "apt-get install -y wordnet-base dict-gcide"
GCIDE_DICT = Path("/usr/share/dictd/gcide.dict.dz")
GCIDE_INDEX = Path("/usr/share/dictd/gcide.index")
WORDNET_DIR = Path("/usr/share/wordnet")
GENSIM_CORPORA = ("lee_background.cor", "lee.cor", "pang_lee_polarity.cor", "crime-and-punishment.txt")
SOURCES = ("gcide", "wordnet", "gensim")

_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)*")
_GCIDE_NOISE = re.compile(r"\[[^\]]*\]|\\[^\\\n]*\\|\{|\}")
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def tokenize(text: str) -> List[str]:
    """Lower-cased runs of ASCII letters (inner apostrophes kept; any other character splits, "café" → ["caf"]):
    ``"Don't stop!"`` → ``["don't", "stop"]``."""
    return _TOKEN.findall(text.lower())


def gensim_test_data() -> Optional[Path]:
    """gensim's test_data folder, located without importing gensim, or None when gensim is not installed."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data"
    return path if path.is_dir() else None


def _b64(s: str) -> int:
    value = 0
    for ch in s:
        value = value * 64 + _B64.index(ch)
    return value


def gcide_documents() -> Iterator[List[str]]:
    """One token list per GCIDE entry (dictd index: headword, base64 offset, base64 length)."""
    with gzip.open(GCIDE_DICT, "rb") as f:
        data = f.read()
    seen = set()
    for line in GCIDE_INDEX.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00-database"):
            continue
        span = (_b64(parts[1]), _b64(parts[2]))
        if span in seen:
            continue
        seen.add(span)
        text = data[span[0] : span[0] + span[1]].decode("utf-8", errors="replace")
        tokens = tokenize(_GCIDE_NOISE.sub(" ", text))
        if tokens:
            yield tokens


def wordnet_documents() -> Iterator[List[str]]:
    """One token list per WordNet synset: its lemmas and its gloss (definition and examples)."""
    for pos in ("noun", "verb", "adj", "adv"):
        with open(WORDNET_DIR / f"data.{pos}", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  "):  # the license header
                    continue
                head, _, gloss = line.partition("|")
                fields = head.split()
                count = int(fields[3], 16)
                lemmas = " ".join(fields[4 + 2 * i].replace("_", " ") for i in range(count))
                tokens = tokenize(re.sub(r"\(\w+\)", " ", lemmas) + " " + gloss)
                if tokens:
                    yield tokens


def gensim_documents() -> Iterator[List[str]]:
    """One token list per line of gensim's test corpora (pang_lee's __label__ prefixes dropped)."""
    root = gensim_test_data()
    if root is None:
        return
    for name in GENSIM_CORPORA:
        path = root / name
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            tokens = tokenize(re.sub(r"__label__\w+", " ", line))
            if tokens:
                yield tokens


def available_sources() -> Dict[str, bool]:
    return {
        "gcide": GCIDE_DICT.is_file() and GCIDE_INDEX.is_file(),
        "wordnet": all((WORDNET_DIR / f"data.{p}").is_file() for p in ("noun", "verb", "adj", "adv")),
        "gensim": gensim_test_data() is not None,
    }


def _resolve(sources: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    have = available_sources()
    if sources == "auto":
        chosen = tuple(s for s in SOURCES if have[s])
        if not chosen:
            raise FileNotFoundError(
                f"no offline corpus source is installed: run `{APT_COMMAND}` and/or `pip install gensim`"
            )
        return chosen
    if isinstance(sources, str):
        sources = (sources,)
    chosen = tuple(sources)
    for s in chosen:
        if s not in SOURCES:
            raise ValueError(f"sources must be 'auto' or a subset of {SOURCES}; got {s!r}")
        if not have[s]:
            hint = f"run `{APT_COMMAND}`" if s != "gensim" else "run `pip install gensim`"
            raise FileNotFoundError(f"the {s!r} source is not installed: {hint}")
    return chosen


def offline_documents(sources: Union[str, Sequence[str]] = "auto") -> Iterator[List[str]]:
    """Token lists from the chosen sources ("auto": every installed one), in the order gcide, wordnet, gensim."""
    makers = {"gcide": gcide_documents, "wordnet": wordnet_documents, "gensim": gensim_documents}
    for s in _resolve(sources):
        yield from makers[s]()


def default_cache_dir() -> Path:
    return Path(os.environ.get("KEXUE_FAST_CACHE", Path.home() / ".cache" / "kexue_fast"))


def offline_corpus(path: Union[str, os.PathLike, None] = None, sources: Union[str, Sequence[str]] = "auto",
                   refresh: bool = False) -> Path:  # fmt: skip
    """Write the offline corpus as a text file (one space-separated document per line) and return its path.

    path: where to write (default ``$KEXUE_FAST_CACHE`` or ~/.cache/kexue_fast, named after the sources); an
    existing file is reused unless ``refresh``. With wordnet-base, dict-gcide and gensim installed it holds about
    6.0M tokens (6,034,850 in benchmarks/results/jose-cpu.md's run); gensim's alone, about 67k. Raises
    FileNotFoundError (naming the apt command) when a requested source is missing.
    """
    chosen = _resolve(sources)
    out = Path(path) if path is not None else default_cache_dir() / f"offline_corpus-{'-'.join(chosen)}.txt"
    if out.is_file() and not refresh:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # a temporary file of its own (a fixed name let two concurrent builds replace each other's), then one rename
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for tokens in offline_documents(chosen):
                f.write(" ".join(tokens) + "\n")
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep the cache from other users of a shared cache folder
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    return out


class _Bunch(dict):
    def __setstate__(self, state):
        self.update(state)


class _NewsgroupUnpickler(pickle.Unpickler):
    """Only the classes the pickled sklearn Bunch needs (never arbitrary code)."""

    _ALLOWED: ClassVar[frozenset] = frozenset(
        {
            ("copy_reg", "_reconstructor"),
            ("__builtin__", "dict"),
            ("__builtin__", "object"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module, name):
        if name == "Bunch":
            return _Bunch
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module == "numpy.core.multiarray":
            import numpy

            module = "numpy._core.multiarray" if hasattr(numpy, "_core") else module
        return super().find_class(module, name)


def mini_newsgroup() -> Tuple[List[List[str]], List[int], List[str]]:
    """gensim's 200-post 20-newsgroups sample (alt.atheism vs sci.space): (token lists of the bodies, labels,
    label names). Headers are dropped (they name the newsgroup)."""
    root = gensim_test_data()
    if root is None or not (root / "mini_newsgroup").is_file():
        raise FileNotFoundError("gensim's test data is not installed: run `pip install gensim`")
    raw = zlib.decompress((root / "mini_newsgroup").read_bytes())
    bunch = _NewsgroupUnpickler(io.BytesIO(raw), encoding="latin1").load()
    docs = []
    for post in bunch["data"]:
        _, _, body = post.partition("\n\n")
        docs.append(tokenize(body))
    return docs, [int(t) for t in bunch["target"]], list(bunch["target_names"])
