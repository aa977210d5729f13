"""The proxy CLIP's figures: its pre-training loss curve (loss_curve.png of trpr.experiments.proxy_pretrain)
and the CLS attention figure of trpr.experiments.proxy_attention."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_loss_curve(history: dict, steps_per_epoch: int, path: Path) -> None:
    """loss_curve.png: per-step training loss (and its per-epoch mean) and the learned logit scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = np.asarray(history["loss"])
    steps = np.arange(1, len(losses) + 1)
    figure, (loss_axis, scale_axis) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    loss_axis.plot(steps, losses, linewidth=0.6, alpha=0.5, label="step")
    epochs = len(losses) // steps_per_epoch
    if epochs:
        means = losses[:epochs * steps_per_epoch].reshape(epochs, steps_per_epoch).mean(1)
        loss_axis.plot((np.arange(epochs) + 1) * steps_per_epoch, means, marker="o", label="epoch mean")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("CLIP loss (symmetric InfoNCE)")
    loss_axis.legend()
    scale_axis.plot(steps, history["logit_scale"])
    scale_axis.set_xlabel("step")
    scale_axis.set_ylabel("logit scale exp(t)")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_attention(pictures: list[dict], attentions: dict, scores: dict, image_size, patch: int, k: int,
                   path: Path) -> None:
    """proxy_attention.png: rows = backbones; each picture with its last-layer CLS attention as a heat map and
    the k patches the fused head keeps outlined (trpr.experiments.proxy_attention)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    height, width = image_size
    rows, columns = len(attentions), len(pictures)
    figure, axes = plt.subplots(rows, columns, figsize=(1.15 * columns + 1.2, (1.15 * height / width + 0.2) * rows + 0.5),
                                dpi=110,
                                squeeze=False)
    for row, (label, attention) in enumerate(attentions.items()):
        for column, picture in enumerate(pictures):
            axis = axes[row][column]
            axis.imshow(np.asarray(picture["image"].resize((width, height))), extent=(0, width, height, 0))
            heat = attention[column].reshape(height // patch, width // patch)
            axis.imshow(heat, cmap="magma", alpha=0.45, extent=(0, width, height, 0), interpolation="nearest")
            for index in np.argsort(-attention[column])[:k]:
                y, x = divmod(int(index), width // patch)
                axis.add_patch(Rectangle((x * patch, y * patch), patch, patch, fill=False, edgecolor="cyan",
                                         linewidth=1.2))
            axis.set_xticks([])
            axis.set_yticks([])
        s = scores[label]
        axes[row][0].set_ylabel(f"{label}\non person {100 * s['attention_on_person']:.0f}%\n"
                                f"top-{k} prec. {100 * s['topk_precision']:.0f}%", fontsize=7)
    figure.suptitle(f"last-layer CLS attention (heat) and the top-{k} patches the fused head keeps (cyan); "
                    f"person patches: {100 * next(iter(scores.values()))['person_patch_fraction']:.0f}% of the grid",
                    fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
