"""JoSE training speed: words per CPU-second of kexue_fast's C++ trainer vs gensim Word2Vec (skip-gram) on one corpus.

Corpus: the offline corpus (kexue_fast.datasets.offline_corpus: GCIDE + WordNet + gensim's test corpora; quick mode
its first 40,000 documents, full mode all of it) or, without the Debian packages, gensim's lee_background.cor; env
KEXUE_JOSE_CORPUS names another file (used as is, in both modes).
Every contestant trains on the same file in its own process: dim 100, window 10, negative 2, min_count 5, sample
1e-3, one worker thread, 1 epoch (quick) or 3 (full). Words = epochs × tokens of the file (the same count for
everyone); CPU seconds = the training's process CPU time (all threads), so the rate is per thread-CPU-second.
  kexue_fast JoSE paper / jose_c   the C++ Hogwild trainer with either step rule (separate hinges)
  gensim Word2Vec sg=1             the anchor (negative sampling, same window / negative / sample)
  official jose.c                  only when env KEXUE_JOSE_C names a binary built from yumeng5/Spherical-Text-Embedding
                                   (its makefile's flags; not shipped here): `-threads 1 -debug 0`, no output file
On CUDA the Triton mini-batch trainer is timed by wall clock (words per second).
"""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path
from typing import List, Optional

from .common import metadata, run_script, write_results

_SCRIPT = r"""
import json, sys, time
which, path, epochs, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
kw = dict(window=10, negative=2, min_count=5, sample=1e-3)
if which == "jose.c":  # the official binary: its CPU time is a child's
    import os, resource, subprocess
    args = [os.environ["KEXUE_JOSE_C"], "-train", path, "-size", "100", "-window", "10", "-negative", "2",
            "-min-count", "5", "-sample", "1e-3", "-iter", str(epochs), "-threads", "1", "-debug", "0"]
    before, wall0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"cpu": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
                      "wall": time.perf_counter() - wall0}))
    sys.exit(0)
if which == "gensim":
    from gensim.models import Word2Vec
    cpu0, wall0 = time.process_time(), time.perf_counter()
    Word2Vec(corpus_file=path, vector_size=100, sg=1, hs=0, epochs=epochs, workers=1, **kw)
else:
    from kexue_fast.jose import JoSE
    rule = which.split(":")[1]
    model = JoSE(dim=100, epochs=epochs, workers=1, step_rule=rule, device=device, progress=False, **kw)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    model.fit(path)
    if device == "cuda":
        import torch
        torch.cuda.synchronize()
cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
print(json.dumps({"cpu": cpu, "wall": wall}))
"""


def _corpus(quick: bool, folder: Path) -> Path:
    from kexue_fast.datasets.offline import available_sources, gensim_test_data, offline_corpus

    if os.environ.get("KEXUE_JOSE_CORPUS"):
        return Path(os.environ["KEXUE_JOSE_CORPUS"])
    have = available_sources()
    if have["gcide"] and have["wordnet"]:
        full = offline_corpus()
        if not quick:
            return full
        out = folder / "offline-head.txt"
        with open(full, encoding="utf-8") as src, open(out, "w", encoding="utf-8") as dst:
            dst.writelines(itertools.islice(src, 40_000))
        return out
    root = gensim_test_data()
    if root is None:
        raise FileNotFoundError("no corpus: `apt-get install -y wordnet-base dict-gcide` or `pip install gensim`")
    return root / "lee_background.cor"


def run(out_dir: Path, quick: bool = True, device: str = "cpu") -> Path:
    epochs = 1 if quick else 3
    rows: List[list] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = _corpus(quick, Path(tmp))
        tokens = sum(len(line.split()) for line in open(path, encoding="utf-8"))
        words = epochs * tokens
        contestants = ["jose:paper", "jose:jose_c"] + (["gensim"] if device == "cpu" else [])
        if device == "cpu" and os.environ.get("KEXUE_JOSE_C"):
            contestants.append("jose.c")
        results = {}
        for which in contestants:
            res: Optional[dict] = run_script(_SCRIPT, [which, str(path), str(epochs), device], which, timeout=3600)
            if res is not None:
                results[which] = res
                print(f"  jose/{device}: {which} wall {res['wall']:.2f} s, CPU {res['cpu']:.2f} s", flush=True)
    names = {"jose:paper": "kexue_fast JoSE (paper rule)", "jose:jose_c": "kexue_fast JoSE (jose_c rule)",
             "gensim": "gensim Word2Vec sg=1", "jose.c": "official jose.c (-O3 -march=native)"}  # fmt: skip
    anchor = results.get("gensim")
    for which, res in results.items():
        per_cpu = words / res["cpu"]
        ratio = f"{per_cpu / (words / anchor['cpu']):.2f}x" if anchor else ""
        rows.append([names[which], f"{res['wall']:.1f}", f"{res['cpu']:.1f}", f"{per_cpu / 1e3:.1f}",
                     f"{words / res['wall'] / 1e3:.1f}", ratio])  # fmt: skip
    header = ["contestant", "wall s", "CPU s", "k words / CPU-s", "k words / s", "vs gensim (per CPU-s)"]
    official = results.get("jose.c")
    for row, which in zip(rows, results):
        row.append(f"{(words / results[which]['cpu']) / (words / official['cpu']):.2f}x" if official else "")
    header.append("vs official jose.c (per CPU-s)")
    notes = (f"{tokens:,} tokens × {epochs} epoch(s) = {words:,} words; one worker thread each; dim 100, window 10, "
             "negative 2, min_count 5, sample 1e-3. CPU time includes reading the corpus and building the "
             "vocabulary for every contestant. "
             + ("" if official else "The official jose.c was not run (set KEXUE_JOSE_C to its binary for its row). ")
             + ("A quick run trains for fractions of a second: its ratios are rough." if quick else ""))  # fmt: skip
    return write_results(out_dir, f"jose-{device}", "JoSE training speed", metadata(device), header, rows, notes)
