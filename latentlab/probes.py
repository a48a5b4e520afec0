"""Linear probes per layer (scikit-learn logistic regression) with honest intervals.

Cross-validation folds are grouped by pair, so the two poles of one pair never sit on both sides of
a split (otherwise a probe can score well by memorising topics). Held-out accuracy on the dataset's
fixed test split gets a Wilson 95% interval. Fitted probes are stored as safetensors (never pickle).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float

from latentlab.activations import ActivationSet
from latentlab.errors import LatentlabError
from latentlab.io import load_tensors, save_tensors
from latentlab.stats import wilson_interval


def _xy(pos: ActivationSet, neg: ActivationSet, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xp, xn = pos.layer(layer).float().numpy(), neg.layer(layer).float().numpy()
    x = np.concatenate([xp, xn])
    y = np.concatenate([np.ones(len(xp)), np.zeros(len(xn))])
    groups = np.concatenate([np.arange(len(xp)), np.arange(len(xn))])
    return x, y, groups


@dataclass
class ProbeReport:
    """Per-layer probe accuracies with 95% intervals, and the fitted probes' weights."""

    layers: list[int]
    cv_acc: list[float]
    cv_ci: list[tuple[float, float]]
    test_acc: list[float | None]
    test_ci: list[tuple[float, float] | None]
    n_train: int
    n_test: int
    coef: Float[torch.Tensor, "n_layers d_model"] | None = None  # in raw activation units
    intercept: Float[torch.Tensor, " n_layers"] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def best_layer(self) -> int:
        """Layer with the best held-out accuracy (cross-validated if no test split); ties -> earliest."""
        score = [t if t is not None else c for t, c in zip(self.test_acc, self.cv_acc)]
        return self.layers[int(np.argmax(score))]

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "cv_acc": self.cv_acc,
            "cv_ci": self.cv_ci,
            "test_acc": self.test_acc,
            "test_ci": self.test_ci,
            "n_train_pairs": self.n_train,
            "n_test_pairs": self.n_test,
            "best_layer": self.best_layer,
            **self.meta,
        }

    def predict(self, acts: ActivationSet) -> Float[torch.Tensor, "n n_layers"]:
        """P(positive pole) for each example at each probe layer."""
        if self.coef is None or self.intercept is None:
            raise LatentlabError("this report holds no fitted probes", "fit them with fit_probes")
        x = torch.stack([acts.layer(layer).float() for layer in self.layers], dim=1)  # [n, L, d]
        return torch.sigmoid((x * self.coef).sum(-1) + self.intercept)

    def score(self, pos: ActivationSet, neg: ActivationSet) -> list[tuple[float, tuple[float, float]]]:
        """Accuracy (and Wilson interval) of the fitted probes on new pairs."""
        pp, pn = self.predict(pos), self.predict(neg)
        out = []
        for j in range(len(self.layers)):
            correct = int((pp[:, j] > 0.5).sum()) + int((pn[:, j] <= 0.5).sum())
            n = len(pp) + len(pn)
            out.append((correct / n, wilson_interval(correct, n)))
        return out

    def save(self, path: str | Path) -> Path:
        if self.coef is None or self.intercept is None:
            raise LatentlabError("no fitted probes to save", "fit them with fit_probes")
        return save_tensors(path, {"coef": self.coef, "intercept": self.intercept}, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> ProbeReport:
        t, m = load_tensors(path)
        keys = ("layers", "cv_acc", "cv_ci", "test_acc", "test_ci", "n_train_pairs", "n_test_pairs")
        vals = [m.pop(k) for k in keys]
        m.pop("best_layer", None)
        return cls(*vals, coef=t["coef"], intercept=t["intercept"], meta=m)  # type: ignore[arg-type]


def fit_probes(
    train_pos: ActivationSet,
    train_neg: ActivationSet,
    test_pos: ActivationSet | None = None,
    test_neg: ActivationSet | None = None,
    folds: int = 5,
    c: float = 1.0,
    seed: int = 0,
) -> ProbeReport:
    """Fit one logistic-regression probe per layer; k-fold (grouped by pair) and held-out accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n = len(train_pos)
    if n < 2 or len(train_neg) < 2:
        raise LatentlabError(f"need at least 2 pairs to fit probes, got {n}", "add more contrast pairs")
    k = max(2, min(folds, n))
    layers = list(train_pos.layers)
    cv_acc, cv_ci, test_acc, test_ci, coefs, intercepts = [], [], [], [], [], []
    for layer in layers:
        x, y, groups = _xy(train_pos, train_neg, layer)
        if not np.isfinite(x).all():
            raise LatentlabError(f"activations at layer {layer} contain NaN or inf", "check the model dtype")

        def make() -> Any:
            return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))

        pred = cross_val_predict(make(), x, y, groups=groups, cv=GroupKFold(n_splits=k))
        correct = int((pred == y).sum())
        cv_acc.append(correct / len(y))
        cv_ci.append(wilson_interval(correct, len(y)))
        clf = make().fit(x, y)
        scaler, lr = clf[0], clf[1]
        w = lr.coef_[0] / scaler.scale_  # fold the scaler into raw-unit weights
        coefs.append(torch.tensor(w, dtype=torch.float32))
        intercepts.append(float(lr.intercept_[0] - (w * scaler.mean_).sum()))
        if test_pos is not None and test_neg is not None:
            xt, yt, _ = _xy(test_pos, test_neg, layer)
            correct_t = int((clf.predict(xt) == yt).sum())
            test_acc.append(correct_t / len(yt))
            test_ci.append(wilson_interval(correct_t, len(yt)))
        else:
            test_acc.append(None)
            test_ci.append(None)
    return ProbeReport(
        layers,
        cv_acc,
        cv_ci,
        test_acc,
        test_ci,
        n,
        len(test_pos) if test_pos is not None else 0,
        torch.stack(coefs),
        torch.tensor(intercepts),
        {"folds": k, "C": c},
    )
