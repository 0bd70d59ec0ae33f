"""PNG figures for the benchmark report (quality vs rounds, communication, ablation).

matplotlib is imported here only (the `bench` extra), with the non-interactive Agg backend, so a
headless machine draws the same figures as a laptop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_quality(quality: dict[str, Any], path: Path) -> Path:
    """Test F1/precision/recall of the student and the FedAvg-only teacher against FedAvg rounds."""
    rounds = sorted(quality, key=int)
    x = [int(r) for r in rounds]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=True)
    for ax, metric in zip(axes, ("f1", "precision", "recall")):
        for who, style in (("student", "o-"), ("fedavg_teacher", "s--")):
            key = f"{who}_{metric}"
            if all(key in quality[r] for r in rounds):
                ax.errorbar(
                    x, [quality[r][key]["mean"] for r in rounds], yerr=[quality[r][key]["std"] for r in rounds],
                    fmt=style, capsize=3, label="FedDALE student" if who == "student" else "FedAvg teacher",
                )
        ax.set_title(metric)
        ax.set_xlabel("FedAvg rounds before distillation")
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out test score (mean ± std over seeds)")
    axes[0].legend(loc="lower right")
    return _save(fig, path)


def plot_communication(communication: dict[str, Any], path: Path) -> Path:
    """Total bytes on the wire (all clients, up + down) per setting, log scale."""
    labels, values = [], []
    for rounds in sorted(communication, key=int):
        row = communication[rounds]
        labels.append("FedDALE one-shot" if int(rounds) == 0 else f"FedDALE {rounds} rounds")
        values.append(row["feddale_total_bytes"])
    last = communication[max(communication, key=int)]
    for key, value in sorted(last.items()):
        if key.startswith("fedavg_") and key.endswith("_total_bytes"):
            labels.append(f"FedAvg {key.split('_')[1]} rounds")
            values.append(value)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    colors = ["tab:gray" if label.startswith("FedAvg") else "tab:blue" for label in labels]
    bars = ax.bar(labels, [v / 1e6 for v in values], color=colors)
    ax.set_yscale("log")
    ax.set_ylabel("total bytes, all clients (MB, log scale)")
    ax.bar_label(bars, labels=[f"{v / 1e6:.3g} MB" for v in values], fontsize=8)
    ax.tick_params(axis="x", labelrotation=20)
    return _save(fig, path)


def plot_ablation(ablation: dict[str, Any], path: Path) -> Path:
    """Student test F1 per ablation variant, one group of bars per FedAvg-round setting."""
    settings = sorted(ablation, key=int)
    names = sorted({name for r in settings for name in ablation[r]}, key=lambda n: (n != "default", n))
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(names) * len(settings)), 3.8))
    width = 0.8 / len(settings)
    for i, rounds in enumerate(settings):
        xs = [j + i * width for j, name in enumerate(names) if name in ablation[rounds]]
        ys = [ablation[rounds][name]["student_f1"]["mean"] for name in names if name in ablation[rounds]]
        ax.bar(xs, ys, width, label=f"{rounds} FedAvg rounds")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=30, ha="right")
    ax.set_ylabel("student test F1")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside the bars
    return _save(fig, path)
