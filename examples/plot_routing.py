#!/usr/bin/python3
"""Draws the multi-layer routing study (examples/multilayer.cpp) from its CSV files.

One figure: the first row holds the layer x layer agreement of each stack (the share of held-out
tokens whose top-1 expert is the same in both layers) and the losses; each further row is one
router's task -> expert shares, a panel per layer (rows are tasks, labelled with their skill).

    /usr/bin/python3 examples/plot_routing.py --csv DIR --png docs/img/multilayer_routing.png

Needs only numpy and matplotlib (Debian: python3-matplotlib).
"""
import argparse
import csv
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROUTERS = ["independent", "omni", "task"]
TITLES = {"independent": "independent (Switch per layer)", "omni": "Omni (one shared router)",
          "task": "task-level (TaskRouter per layer)"}


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def agreement(directory, router):
    """The [layers, layers] top-1 agreement matrix, or None when the run has no such file."""
    path = os.path.join(directory, f"multilayer_agreement_{router}.csv")
    if not os.path.exists(path):
        return None
    rows = read(path)
    n = 1 + max(int(r["layer_a"]) for r in rows)
    m = np.zeros((n, n))
    for r in rows:
        m[int(r["layer_a"]), int(r["layer_b"])] = float(r["top1"])
    return m


def task_experts(rows, router):
    """{layer: [tasks, experts] shares} and the skill of each task, for one router."""
    rows = [r for r in rows if r["router"] == router]
    experts = sorted((k for k in rows[0] if k.startswith("expert_")), key=lambda k: int(k[7:]))
    layers = sorted({int(r["layer"]) for r in rows})
    tasks = 1 + max(int(r["task"]) for r in rows)
    shares = {l: np.zeros((tasks, len(experts))) for l in layers}
    skill = [0] * tasks
    for r in rows:
        shares[int(r["layer"])][int(r["task"])] = [float(r[e]) for e in experts]
        skill[int(r["task"])] = int(r["skill"])
    return shares, skill


def annotate(ax, m, fmt):
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7,
                color="white" if v > 0.6 else "black")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--csv", default=".", help="directory of multilayer's CSV files (its --out)")
    p.add_argument("--png", default="multilayer_routing.png", help="the figure to write")
    args = p.parse_args()

    routers = [r for r in ROUTERS if agreement(args.csv, r) is not None]
    te = read(os.path.join(args.csv, "multilayer_task_experts.csv"))
    loss = read(os.path.join(args.csv, "multilayer_loss.csv"))
    layers = len(agreement(args.csv, routers[0]))
    cols = max(layers, len(routers) + 1)
    fig, axes = plt.subplots(1 + len(routers), cols, figsize=(2.3 * cols, 2.3 * (1 + len(routers))),
                             squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()

    for c, router in enumerate(routers):
        ax = axes[0, c]
        ax.set_axis_on()
        m = agreement(args.csv, router)
        ax.imshow(m, vmin=0, vmax=1, cmap="Greens")
        annotate(ax, m, "{:.2f}")
        ticks = [f"L{l}" for l in range(layers)]
        ax.set_xticks(range(layers), ticks, fontsize=7)
        ax.set_yticks(range(layers), ticks, fontsize=7)
        off = m[~np.eye(layers, dtype=bool)].mean()
        ax.set_title(f"{router}: agreement\n(mean off-diagonal {off:.2f})", fontsize=8)

    ax = axes[0, len(routers)]
    ax.set_axis_on()
    names = [r["router"] for r in loss]
    x = np.arange(len(names))
    ax.bar(x - 0.2, [float(r["train_mse"]) for r in loss], 0.4, label="train")
    ax.bar(x + 0.2, [float(r["heldout_mse"]) for r in loss], 0.4, label="held-out")
    ax.set_xticks(x, names, fontsize=7)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title("MSE", fontsize=8)
    ax.legend(fontsize=7)

    for row, router in enumerate(routers, start=1):
        shares, skill = task_experts(te, router)
        for l, m in shares.items():
            ax = axes[row, l]
            ax.set_axis_on()
            ax.imshow(m, vmin=0, vmax=1, cmap="Blues", aspect="auto")
            annotate(ax, m, "{:.1f}")
            ax.set_xticks(range(m.shape[1]), [f"e{e}" for e in range(m.shape[1])], fontsize=7)
            ax.set_yticks(range(m.shape[0]), [f"t{t} s{skill[t]}" for t in range(m.shape[0])], fontsize=7)
            ax.set_title(f"{TITLES[router] if l == 0 else router}: L{l}", fontsize=8)
    fig.suptitle("task -> expert shares per layer (rows: task t, skill s) and cross-layer agreement", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.png, dpi=80)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
