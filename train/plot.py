"""python -m train.plot RUN_DIR [--out DIR]: PNG training curves of a run.

Reads RUN_DIR/logs/*.jsonl of every job start of the run (train/runlogs.py merges them
in iteration order) and writes, with matplotlib's Agg backend, into RUN_DIR/plots/:

    loss.png (training loss, validation loss on top)   val_loss.png   lr.png
    loss_terms.png (QAD: the loss's terms kd_loss and lm_loss)
    tokens_per_s.png   mfu.png   grad_norm.png   memory.png   overview.png (all in a grid)

A curve with no values (MFU on a CPU, no evaluation) is left out and named on stdout; the
last line gives the first and last training loss.
Errors (no such directory, no metric logs) print `error: ...` and exit 2.
"""

import argparse
import sys
from pathlib import Path

from train.runlogs import merged_records, number

EXIT_USAGE = 2
# file stem -> (title, y label, [(source, key, label)]); source: train | eval
CURVES = {
    "loss": ("Loss", "loss", [("train", "loss", "train"), ("eval", "val_loss", "validation")]),
    "val_loss": ("Validation loss", "loss", [("eval", "val_loss", "validation")]),
    "loss_terms": ("QAD loss terms", "loss", [("train", "kd_loss", "kd_loss (T^2 KL)"),
                                             ("train", "lm_loss", "lm_loss (CE)")]),
    "lr": ("Learning rate", "lr", [("train", "lr", "lr")]),
    "tokens_per_s": ("Throughput", "tokens/s", [("train", "tokens_per_s", "all devices"),
                                                 ("train", "tokens_per_s_per_device", "per device")]),
    "mfu": ("Model FLOPs utilization", "MFU (%)", [("train", "mfu", "MFU")]),
    "grad_norm": ("Gradient norm", "grad norm", [("train", "grad_norm", "grad norm")]),
    "memory": ("Memory", "GiB", [("train", "memory_allocated_gb", "allocated"),
                                 ("train", "memory_peak_gb", "peak")]),
}


def series(records: list[dict], key: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for record in records:
        value = number(record.get(key))
        if value is not None:
            xs.append(record["iteration"])
            ys.append(value * scale)
    return xs, ys


def plot_run(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Writes the PNGs; returns their paths. Raises FileNotFoundError / ValueError."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    train, evaluation = merged_records(run_dir)
    if not train and not evaluation:
        raise ValueError(f"{run_dir}: no metric records in {run_dir / 'logs'}/*.jsonl")
    out_dir = Path(out_dir) if out_dir else run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = {"train": train, "eval": evaluation}
    drawn = {}
    for stem, (title, ylabel, lines) in CURVES.items():
        data = [(label, *series(sources[src], key, 100.0 if key == "mfu" else 1.0)) for src, key, label in lines]
        data = [(label, xs, ys) for label, xs, ys in data if xs]
        if not data:
            print(f"{stem}: no values (skipped)")
            continue
        drawn[stem] = (title, ylabel, data)
    written = []
    for stem, (title, ylabel, data) in drawn.items():
        figure, axis = plt.subplots(figsize=(7, 4))
        draw(axis, title, ylabel, data, stem)
        figure.tight_layout()
        path = out_dir / f"{stem}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    if drawn:
        columns = 2
        rows = (len(drawn) + columns - 1) // columns
        figure, axes = plt.subplots(rows, columns, figsize=(12, 3.5 * rows), squeeze=False)
        for axis, (stem, (title, ylabel, data)) in zip(axes.flat, drawn.items()):
            draw(axis, title, ylabel, data, stem)
        for axis in list(axes.flat)[len(drawn):]:
            axis.set_visible(False)
        figure.suptitle(run_dir.name)
        figure.tight_layout()
        path = out_dir / "overview.png"
        figure.savefig(path, dpi=80)
        plt.close(figure)
        written.append(path)
    return written


def draw(axis, title: str, ylabel: str, data, stem: str) -> None:
    from matplotlib.ticker import MaxNLocator

    for label, xs, ys in data:
        axis.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
    axis.set_title(title)
    axis.set_xlabel("iteration")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_ylabel(ylabel)
    if stem == "lr":
        axis.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axis.grid(alpha=0.3)
    if len(data) > 1:
        axis.legend()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run directory ($QAD_CHECKPOINT_ROOT/<run name>)")
    parser.add_argument("--out", help="output directory (default: RUN_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        written = plot_run(Path(args.run_dir), Path(args.out) if args.out else None)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    for path in written:
        print(path)
    summary = loss_summary(merged_records(Path(args.run_dir))[0])
    if summary:
        print(summary)
    return 0


def loss_summary(train: list[dict]) -> str | None:
    """'loss 7.61 (iteration 1) -> 5.78 (iteration 80)': the first and last logged training loss."""
    points = list(zip(*series(train, "loss")))
    if len(points) < 2:
        return None
    (first_iteration, first), (last_iteration, last) = points[0], points[-1]
    return f"loss {first:.3f} (iteration {first_iteration}) -> {last:.3f} (iteration {last_iteration})"


if __name__ == "__main__":
    sys.exit(main())
