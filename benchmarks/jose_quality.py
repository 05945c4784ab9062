"""JoSE word-similarity quality: kexue_fast's trainer (both step rules) against the official jose.c, same corpus.

    KEXUE_JOSE_C=/path/to/jose python -m kexue_fast.benchmarks.jose_quality [--workers 2] [--epochs 3]

The offline corpus (kexue_fast.datasets.offline_corpus; needs `apt-get install -y wordnet-base dict-gcide`), dim 100,
window 10, negative 2, margin 0.15, alpha 0.04, sample 1e-3, min_count 5. Each model's word (u) and context (v)
tables are scored by Spearman ρ on WordSim-353 and SimLex-999 (gensim's copies). The official binary (built from
yumeng5/Spherical-Text-Embedding's src/jose.c; not shipped) runs only when KEXUE_JOSE_C names it; its tables are read
back from its word2vec text output.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List

from .common import metadata, write_results

DATASETS = ("wordsim353", "simlex999")


def _scores(kv) -> List[float]:
    from kexue_fast.jose import evaluate_word_similarity

    return [evaluate_word_similarity(kv, name).spearman for name in DATASETS]


def _official(binary: str, corpus: Path, epochs: int, workers: int, folder: Path) -> Dict[str, List[float]]:
    from kexue_fast.jose.keyed_vectors import KeyedVectors

    words, contexts = folder / "w.txt", folder / "c.txt"
    args = [binary, "-train", str(corpus), "-size", "100", "-window", "10", "-negative", "2", "-margin", "0.15",
            "-alpha", "0.04", "-sample", "1e-3", "-min-count", "5", "-iter", str(epochs), "-threads", str(workers),
            "-debug", "0", "-word-output", str(words), "-context-output", str(contexts)]  # fmt: skip
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    tables = (("wv", words), ("cv", contexts))
    return {table: _scores(KeyedVectors.load_word2vec_format(path)) for table, path in tables}


def run(out_dir: Path, epochs: int = 3, workers: int = 2) -> Path:
    from kexue_fast.datasets import offline_corpus
    from kexue_fast.jose import JoSE

    corpus = offline_corpus()
    results: Dict[str, Dict[str, List[float]]] = {}
    for rule in ("paper", "jose_c"):
        model = JoSE(dim=100, window=10, negative=2, min_count=5, epochs=epochs, workers=workers, step_rule=rule,
                     progress=False).fit(corpus)  # fmt: skip
        results[f"kexue_fast JoSE ({rule} rule)"] = {"wv": _scores(model.wv), "cv": _scores(model.cv)}
        print(f"  jose quality: {rule} {results[f'kexue_fast JoSE ({rule} rule)']}", flush=True)
    binary = os.environ.get("KEXUE_JOSE_C")
    if binary:
        with tempfile.TemporaryDirectory() as tmp:
            results["official jose.c"] = _official(binary, corpus, epochs, workers, Path(tmp))
    rows = [[name, table, *(f"{s:.3f}" for s in scores[table])] for name, scores in results.items() for table in scores]
    notes = (f"Offline corpus ({corpus.stat().st_size / 1e6:.1f} MB), {epochs} epochs, {workers} Hogwild threads each "
             "(so the scores vary by about ±0.01 between runs); dim 100, window 10, negative 2, min_count 5. wv: the "
             "centre-word table (u, jose.c's -word-output), cv: the context table (v, -context-output)."
             + ("" if binary else " The official jose.c was not run (set KEXUE_JOSE_C to its binary)."))  # fmt: skip
    header = ["model", "table", "WordSim-353 ρ", "SimLex-999 ρ"]
    return write_results(out_dir, "jose-quality", "JoSE word similarity vs the official jose.c", metadata("cpu"),
                         header, rows, notes)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m kexue_fast.benchmarks.jose_quality", description=__doc__)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    path = run(args.out, args.epochs, args.workers)
    print(path.read_text())


if __name__ == "__main__":
    main()
