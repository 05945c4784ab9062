"""JoSE word-similarity quality: kexue_fast's trainer (both step rules) against the official jose.c, same corpus.

    KEXUE_JOSE_C=/path/to/jose python -m kexue_fast.benchmarks.jose_quality [--workers 2] [--epochs 3]
    python -m kexue_fast.benchmarks.jose_quality --device cuda [--corpus FILE] [--datasets DIR]   # the GPU trainer

The offline corpus (kexue_fast.datasets.offline_corpus; needs `apt-get install -y wordnet-base dict-gcide`), dim 100,
window 10, negative 2, margin 0.15, alpha 0.04, sample 1e-3, min_count 5. Each model's word (u) and context (v)
tables are scored by Spearman ρ on WordSim-353 and SimLex-999 (gensim's copies). The official binary (built from
yumeng5/Spherical-Text-Embedding's src/jose.c; not shipped) runs only when KEXUE_JOSE_C names it; its tables are read
back from its word2vec text output. With --device cuda the Triton mini-batch trainer is scored instead (the official
binary is CPU-only); --corpus and --datasets (a folder holding wordsim353.tsv and simlex999.txt) serve machines without
the Debian packages or gensim.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

from .common import metadata, write_results

DATASETS = ("wordsim353", "simlex999")


def _scores(kv, datasets: Optional[Path] = None) -> List[float]:
    from kexue_fast.jose import evaluate_word_similarity
    from kexue_fast.jose.evaluation import DATASETS as FILES

    return [evaluate_word_similarity(kv, str(datasets / FILES[name]) if datasets else name).spearman
            for name in DATASETS]  # fmt: skip


def _official(binary: str, corpus: Path, epochs: int, workers: int, folder: Path) -> Dict[str, List[float]]:
    from kexue_fast.jose.keyed_vectors import KeyedVectors

    words, contexts = folder / "w.txt", folder / "c.txt"
    args = [binary, "-train", str(corpus), "-size", "100", "-window", "10", "-negative", "2", "-margin", "0.15",
            "-alpha", "0.04", "-sample", "1e-3", "-min-count", "5", "-iter", str(epochs), "-threads", str(workers),
            "-debug", "0", "-word-output", str(words), "-context-output", str(contexts)]  # fmt: skip
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    tables = (("wv", words), ("cv", contexts))
    return {table: _scores(KeyedVectors.load_word2vec_format(path)) for table, path in tables}


def run(out_dir: Path, epochs: int = 3, workers: int = 2, device: str = "cpu", corpus: Optional[Path] = None,
        datasets: Optional[Path] = None) -> Path:  # fmt: skip
    from kexue_fast.datasets import offline_corpus
    from kexue_fast.jose import JoSE

    corpus = corpus or offline_corpus()
    results: Dict[str, Dict[str, List[float]]] = {}
    speed: Dict[str, List[str]] = {}  # training seconds (vocabulary built beforehand) and M words/s
    for rule in ("paper", "jose_c"):
        name = f"kexue_fast JoSE ({rule} rule)" + (", GPU trainer" if device == "cuda" else "")
        model = JoSE(dim=100, window=10, negative=2, min_count=5, epochs=epochs, workers=workers, step_rule=rule,
                     device=device, progress=False).fit(corpus)  # fmt: skip
        results[name] = {"wv": _scores(model.wv, datasets), "cv": _scores(model.cv, datasets)}
        speed[name] = [f"{model.train_seconds_:.1f}", f"{epochs * model.n_tokens_ / model.train_seconds_ / 1e6:.2f}"]
        print(f"  jose quality: {name} {results[name]}", flush=True)
    binary = os.environ.get("KEXUE_JOSE_C") if device == "cpu" else None
    if binary:
        with tempfile.TemporaryDirectory() as tmp:
            results["official jose.c"] = _official(binary, corpus, epochs, workers, Path(tmp))
    rows = [[name, table, *(f"{s:.3f}" for s in scores[table]), *speed.get(name, ["", ""])]
            for name, scores in results.items() for table in scores]  # fmt: skip
    trainer = (f"{workers} Hogwild threads each (so the scores vary by about ±0.01 between runs)" if device == "cpu"
               else "the Triton mini-batch trainer on the GPU")  # fmt: skip
    notes = (f"Corpus {corpus.name} ({corpus.stat().st_size / 1e6:.1f} MB), {epochs} epochs, {trainer}; dim 100, "
             "window 10, negative 2, min_count 5. Training s: the trainer alone (vocabulary built beforehand). wv: the "
             "centre-word table (u, jose.c's -word-output), cv: the context table (v, -context-output)."
             + ("" if binary else " The official jose.c was not run (set KEXUE_JOSE_C to its binary)."))  # fmt: skip
    header = ["model", "table", "WordSim-353 ρ", "SimLex-999 ρ", "training s", "M words / s"]
    stem = "jose-quality" + ("-cuda" if device == "cuda" else "")
    return write_results(out_dir, stem, "JoSE word similarity vs the official jose.c", metadata(device), header, rows,
                         notes)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m kexue_fast.benchmarks.jose_quality", description=__doc__)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--corpus", type=Path, help="training text (default: the offline corpus)")
    parser.add_argument("--datasets", type=Path, help="folder of wordsim353.tsv, simlex999.txt (default: gensim's)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    path = run(args.out, args.epochs, args.workers, args.device, args.corpus, args.datasets)
    print(path.read_text())


if __name__ == "__main__":
    main()
