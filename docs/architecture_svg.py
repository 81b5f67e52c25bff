"""Write docs/architecture.svg, the picture of docs/architecture.md.

``python docs/architecture_svg.py > docs/architecture.svg``: plain SVG text, no dependencies and no network,
so the picture is reviewed as a diff and the site builds offline.
"""

import sys
from html import escape

W, H = 960, 650
ARROW = '<path d="M0,0 L10,5 L0,10 z" fill="#444"/>'
out: list[str] = []


def box(x: float, y: float, w: float, h: float, title: str, lines: list[str], fill: str, stroke: str) -> None:
    """A rounded box with a bold title and smaller lines under it."""
    out.append(f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="6" fill="{fill}" stroke="{stroke}"/>')
    out.append(f'<text x="{x + w / 2}" y="{y + 18}" text-anchor="middle" font-weight="bold">{escape(title)}</text>')
    for i, line in enumerate(lines):
        y_line = y + 18 + 16 * (i + 1)
        small = 'text-anchor="middle" font-size="11.5" fill="#333"'
        out.append(f'<text x="{x + w / 2}" y="{y_line}" {small}>{escape(line)}</text>')


def arrow(x1: float, y1: float, x2: float, y2: float, dash: bool = False) -> None:
    """An arrow from (x1, y1) to (x2, y2); dashed for an import across the packages."""
    style = ' stroke-dasharray="5,4"' if dash else ""
    out.append(
        f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="#444" stroke-width="1.4" marker-end="url(#a)"{style}/>'
    )


def text(x: float, y: float, s: str, size: float = 12, anchor: str = "start", bold: bool = False) -> None:
    """A line of text."""
    weight = "bold" if bold else "normal"
    out.append(
        f'<text x="{x}" y="{y}" font-size="{size}" text-anchor="{anchor}" font-weight="{weight}">{escape(s)}</text>'
    )


def draw() -> None:
    """The data flow (top) and the rooms by floor (bottom)."""
    out.append(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
        'font-family="Helvetica, Arial, sans-serif" font-size="13">'
    )
    out.append("<title>lightning-meta: data flow and rooms</title>")
    out.append(
        '<defs><marker id="a" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        f'orient="auto-start-reverse">{ARROW}</marker></defs>'
    )
    out.append(f'<rect width="{W}" height="{H}" fill="white"/>')

    text(20, 26, "1. Data flows one way", 15, bold=True)
    flow = [
        ("bundle", ["files -> uint8 tensor cache", "Omniglot, MiniImageNet, ..."]),
        ("sampler", ["vectorised class indices", "seeded per split, epoch, rank"]),
        ("EpisodeBatch", ["support / query tensors", "[B, ...] and its ways"]),
        ("module hook", ["episode_logits(batch)", "or episode_loss, task_loss"]),
        ("metrics and logs", ["loss, acc, 95% CI", "val/acc, test/acc_ci95"]),
    ]
    width, gap, y0 = 160, 27, 40
    for i, (title, lines) in enumerate(flow):
        x = 20 + i * (width + gap)
        box(x, y0, width, 62, title, lines, "#fdf5e6", "#c08a2e")
        if i:
            arrow(x - gap, y0 + 31, x - 2, y0 + 31)
    text(
        20, 124, "Nothing flows back: a module never reads support_y.max() or trainer.datamodule. What it needs to know"
    )
    text(
        20,
        140,
        "about the data reaches it forward, through the batch (ways) or through the CLI's links (ways, image_size,",
    )
    text(20, 156, "channels, num_train_classes).")

    text(20, 188, "2. Rooms, by floor: an arrow is an import, and every import points down", 15, bold=True)
    left, right, left_w, right_w, fh, fgap, top = 20, 420, 360, 520, 66, 22, 215
    text(left + left_w / 2, top - 8, "datamodules", 14, "middle", bold=True)
    text(right + right_w / 2, top - 8, "lightning_meta", 14, "middle", bold=True)
    floors_data = [
        (
            "bundles",
            [
                "Omniglot, MiniImageNet, TieredImageNet, CIFARFS, FC100,",
                "CUB, EpisodicImageFolder, Sinusoid; rl families",
            ],
        ),
        ("the two children", ["EpisodicDataModule (episodes)", "rl.TaskDistribution + TaskEnv (meta-RL tasks)"]),
        ("stream base: StreamDataModule", ["seeding, DDP sharding, DataLoaders,", "mid-epoch resume"]),
        ("episodes", ["EpisodeBatch (with ways), ClassEpisodeSampler,", "EpisodeStream, loaders, atomic files"]),
    ]
    floors_model = [
        ("entry", ["lightning_meta.cli, links (data -> model sizes),", "inference (lightning-meta predict)"]),
        ("methods and diagnostics",
         ["one file per method (ProtoNet, MAML, ...),", "lightning_meta.rl (MAMLRL, RL2), callbacks"]),
        ("bases", ["EpisodicModule, GradientModule,", "PretrainedModule, MetaRLModule"]),
        ("engine: lightning_meta.functional",
         ["inner_loop (per-step hooks), map_tasks + TaskRunner,", "forward_with; task_batched"]),
        ("leaves",
         ["backbones, inner_optimizers, checkpoints, metrics,", "solvers, precision, memory_format (ChannelsLast)"]),
    ]  # fmt: skip
    for i, (title, lines) in enumerate(floors_model):
        y = top + i * (fh + fgap)
        box(right, y, right_w, fh, title, lines, "#eef3fb", "#4a6fa5")
        if i:
            arrow(right + right_w / 2, y - fgap, right + right_w / 2, y - 2)
    # datamodules has one floor less: it starts a floor lower, so both columns end on the same line.
    for i, (title, lines) in enumerate(floors_data):
        y = top + (i + 1) * (fh + fgap)
        box(left, y, left_w, fh, title, lines, "#edf7ee", "#4a8a55")
        if i:
            arrow(left + left_w / 2, y - fgap, left + left_w / 2, y - 2)
    bottom = top + 4 * (fh + fgap)
    # Across the packages: the methods read the task distribution's env, the bases EpisodeBatch, checkpoints the files.
    arrow(right, top + 1 * (fh + fgap) + fh / 2, left + left_w + 2, top + 2 * (fh + fgap) + fh / 2, dash=True)
    arrow(right, top + 2 * (fh + fgap) + fh / 2, left + left_w + 2, bottom + fh / 2 - 6, dash=True)
    arrow(right, bottom + fh / 2 + 6, left + left_w + 2, bottom + fh / 2 + 6, dash=True)
    text(left, top + 8, "No import runs upward, and none runs")
    text(left, top + 24, "from datamodules into lightning_meta:")
    text(left, top + 40, "the data knows nothing of the models.")
    text(left, top + 56, "Dashed: lightning_meta importing datamodules.")
    out.append("</svg>")


if __name__ == "__main__":
    draw()
    sys.stdout.write("\n".join(out) + "\n")
