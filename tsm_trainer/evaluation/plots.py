"""PNG outputs: loss against t for several models on one chart, and labelled sample grids."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tsm_trainer.core.atomic_write import atomic_file


def plot_loss_curves(
    curves: Mapping[str, Sequence[float]],
    num_train_timesteps: int,
    path: str,
    reference: str | None = None,
    title: str = "held-out denoising loss",
    spread: Mapping[str, Sequence[float]] | None = None,
) -> str:
    """Write a PNG: left, each curve's loss per equal t-bin (log scale) against the bin centre;
    right, each curve relative to ``reference`` (default: the first), where differences too small to
    see on the left show. ``spread[label]`` (optional, same length) is drawn as a +-band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(curves)
    reference = reference or labels[0]
    bins = len(curves[reference])
    centres = [(i + 0.5) * num_train_timesteps / bins for i in range(bins)]
    fig, (ax_abs, ax_rel) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label in labels:
        values = list(curves[label])
        (line,) = ax_abs.plot(centres, values, label=label, linewidth=1.5)
        rel = [100.0 * (v / r - 1.0) for v, r in zip(values, curves[reference])]
        ax_rel.plot(centres, rel, color=line.get_color(), linewidth=1.5)
        if spread and label in spread:
            lo = [v - s for v, s in zip(values, spread[label])]
            hi = [v + s for v, s in zip(values, spread[label])]
            ax_abs.fill_between(centres, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
            ax_rel.fill_between(
                centres,
                [100.0 * (v / r - 1.0) for v, r in zip(lo, curves[reference])],
                [100.0 * (v / r - 1.0) for v, r in zip(hi, curves[reference])],
                color=line.get_color(),
                alpha=0.15,
                linewidth=0,
            )
    ax_abs.set_yscale("log")
    ax_abs.set_xlabel("timestep t (0 = clean)")
    ax_abs.set_ylabel("loss")
    ax_abs.set_title(title)
    ax_abs.legend(fontsize=8)
    ax_rel.axhline(0.0, color="gray", linewidth=0.8)
    ax_rel.set_xlabel("timestep t (0 = clean)")
    ax_rel.set_ylabel(f"% vs {reference}")
    ax_rel.set_title(f"relative to {reference} (lower is better)")
    for ax in (ax_abs, ax_rel):
        ax.set_xlim(0, num_train_timesteps)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with atomic_file(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return path


def labelled_grid(
    rows: Sequence[tuple[str, Sequence]], size: int = 64, label_width: int = 150, column_labels: Sequence[str] = ()
):
    """A PIL image: one row per (label, images), the label on the left, optional column labels on top."""
    from PIL import Image, ImageDraw

    top = 14 if column_labels else 0
    columns = max(len(images) for _, images in rows)
    grid = Image.new("RGB", (label_width + size * columns, top + size * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c, text in enumerate(column_labels):
        draw.text((label_width + c * size + 2, 1), text[: size // 6], fill="black")
    for r, (label, images) in enumerate(rows):
        draw.text((4, top + r * size + size // 2 - 6), label, fill="black")
        for c, image in enumerate(images):
            grid.paste(image.resize((size, size)), (label_width + c * size, top + r * size))
    return grid
