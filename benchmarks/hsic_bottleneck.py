"""Layer-wise training without back-propagation by the HSIC bottleneck (Ma, Lewis & Kleijn 2020) on scikit-learn's
bundled 8×8 digits (no download), reporting test accuracy.

    python -m kexue_fast.benchmarks.hsic_bottleneck [--epochs 8]

Each hidden layer h_i = tanh(W_i h_{i−1}) is trained on its own loss HSIC(h_i, X) − β·HSIC(h_i, Y) with its input
detached, so no gradient crosses layers (kexue_fast.hsic.bottleneck_loss: exact, tiled). The last hidden layer has
one unit per class. Two read-outs: (1) each output unit is assigned the class whose training samples
activate it most and a test sample is predicted by its most active unit; (2) a linear classifier trained (cross-
entropy) on the frozen last hidden layer — reported next to the same probe on the same network left at its random
initialization, which tells what the layer-wise HSIC training itself adds. σ = 0.5 suits pixels in [0, 1] (the paper's
σ = 5 was for its own input scaling: here it makes every kernel value ≈ 1).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from torch import nn

import kexue_fast

from .common import metadata, write_results


def load_digits_split(seed: int = 0):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n_test = x.shape[0] // 5
    return x[perm[n_test:]], y[perm[n_test:]], x[perm[:n_test]], y[perm[:n_test]]


def linear_probe(features_train, y_train, features_test, y_test, steps: int = 300) -> float:
    """Test accuracy of a linear softmax classifier trained on frozen features (full-batch Adam)."""
    torch.manual_seed(0)
    probe = nn.Linear(features_train.shape[1], 10)
    opt = torch.optim.Adam(probe.parameters(), lr=0.05)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(probe(features_train), y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((probe(features_test).argmax(1) == y_test).float().mean())


def run(out_dir: Path, epochs: int = 20, batch: int = 128, beta: float = 100.0, sigma: float = 0.5,
        normalized: bool = True, seed: int = 0):  # fmt: skip
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits_split(seed)
    widths = [64, 64, 32, 10]
    layers = [nn.Sequential(nn.Linear(a, b), nn.Tanh()) for a, b in zip(widths[:-1], widths[1:])]
    random_layers = copy.deepcopy(layers)
    optimizers = [torch.optim.Adam(layer.parameters(), lr=1e-3) for layer in layers]
    start = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(x_train.shape[0])
        for i0 in range(0, x_train.shape[0], batch):
            idx = perm[i0 : i0 + batch]
            if idx.numel() < 8:
                continue
            xb, yb = x_train[idx], y_train[idx]
            h = xb
            for layer, opt in zip(layers, optimizers):
                z = layer(h.detach())  # no gradient crosses layers: no back-propagation
                loss, _, _ = kexue_fast.hsic.bottleneck_loss(z, xb, yb, beta=beta, sigma=sigma, normalized=normalized,
                                                             n_classes=10)  # fmt: skip
                opt.zero_grad()
                loss.backward()
                opt.step()
                h = z
    seconds = time.perf_counter() - start

    def forward(stack, x, upto):
        with torch.no_grad():
            for layer in stack[:upto]:
                x = layer(x)
        return x

    train_out, test_out = forward(layers, x_train, len(layers)), forward(layers, x_test, len(layers))
    means = torch.stack([train_out[y_train == c].mean(0) for c in range(10)])  # [class, unit]
    unit_class = means.argmax(0)  # each output unit -> the class activating it most
    unit_accuracy = float((unit_class[test_out.argmax(1)] == y_test).float().mean())
    hidden = len(layers) - 1  # the last hidden (pre-output) layer
    probe_hsic = linear_probe(forward(layers, x_train, hidden), y_train, forward(layers, x_test, hidden), y_test)
    probe_random = linear_probe(forward(random_layers, x_train, hidden), y_train,
                                forward(random_layers, x_test, hidden), y_test)  # fmt: skip
    header = ["network", "epochs", "sigma", "beta", "train s", "unit read-out", "linear probe (HSIC-trained)",
              "linear probe (random init)"]  # fmt: skip
    rows = [["64-64-32-10 tanh", epochs, sigma, beta, f"{seconds:.0f}", f"{unit_accuracy:.3f}", f"{probe_hsic:.3f}",
             f"{probe_random:.3f}"]]  # fmt: skip
    variant = "normalized" if normalized else "plain"
    notes = (f"sklearn digits, 20% held out ({x_test.shape[0]} images), batch {batch}, Adam 1e-3 per layer, {variant} "
             "HSIC bottleneck; test accuracies; chance is 0.1.")  # fmt: skip
    return write_results(out_dir, "hsic-bottleneck-digits", "HSIC bottleneck: layer-wise training without backprop",
                         metadata("cpu"), header, rows, notes)  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kexue_fast.benchmarks.hsic_bottleneck", description=__doc__)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    print(run(args.out, epochs=args.epochs).read_text())


if __name__ == "__main__":
    main()
