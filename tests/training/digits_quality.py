"""Quality figures of a digits model: an SVC trained on the real digits judges generated ones.

``python -m tests.training.digits_quality [MODEL] [--backend torch|flax] [--per-class N]`` prints them.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from scipy import linalg
from sklearn.decomposition import PCA
from sklearn.model_selection import train_test_split
from sklearn.svm import SVC

from diffusion_core import training


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def quality(images: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, float]:
    """images: (N, 16, 16) in [0, 1], generated for ``labels``; the figures of issue 9."""
    data = training.load_digits(16)
    real = ((data.images[:, 0] + 1) / 2).reshape(len(data.images), -1)
    x_tr, x_te, y_tr, y_te = train_test_split(real, data.labels, test_size=0.4, random_state=seed, stratify=data.labels)
    clf = SVC(probability=True, random_state=seed).fit(x_tr, y_tr)
    gen = images.reshape(len(images), -1)
    prob = clf.predict_proba(gen)
    real_prob = clf.predict_proba(x_te)
    pca = PCA(20, random_state=seed).fit(x_tr)
    half = len(x_te) // 2
    real_vs_real = _frechet(pca.transform(x_te[:half]), pca.transform(x_te[half:]))
    gen_vs_real = _frechet(pca.transform(gen), pca.transform(x_te))
    return {
        "svc_held_out_accuracy": float((clf.predict(x_te) == y_te).mean()),
        "confident_fraction": float((prob.max(1) >= 0.8).mean()),
        "real_confident_fraction": float((real_prob.max(1) >= 0.8).mean()),
        "classes_present": int(len(np.unique(prob.argmax(1)))),
        "class_match": float((prob.argmax(1) == labels).mean()),
        "frechet_gen_vs_real": gen_vs_real,
        "frechet_real_vs_real": real_vs_real,
        "frechet_ratio": gen_vs_real / real_vs_real,
    }


def generate(model: str | None, backend: str, per_class: int, steps: int = 50) -> tuple[np.ndarray, np.ndarray]:
    from diffusion_core.cli_generate import generate_images
    from diffusion_core.training.presets import default_model_path

    labels = np.repeat(np.arange(10), per_class)
    images = generate_images(model or str(default_model_path()), backend, None, steps, 0, len(labels), labels.tolist())
    return images[..., 0].astype(np.float32) / 255.0, labels


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--per-class", type=int, default=20)
    args = parser.parse_args()
    print(json.dumps(quality(*generate(args.model, args.backend, args.per_class)), indent=2))
