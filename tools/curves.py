"""The pictures of tools/compare.py, drawn with PIL alone: compare.png (each method's samples and
reconstructions, and beside them the few-shot probe against FID) and curves.png.

curves.png has three plots, read from each pre-training's log.jsonl (train.py writes it):
  (a) the in-training probe against training images (step * batch size): train.py's 100-shot
      ridge probe of the EMA weights ("probe_ema"), scored on the first 2000 test images; dit and
      maskdit are read at t = 50, their official read-out; grey dashes: the same probe of raw
      pixels ("probe_pixels", logged at step 0)
  (b) the same probe against training FLOPs (images * tools/bench.py's step_flops per image)
  (c) the training loss against training images (each method's own loss: compare shapes, not
      heights)
With several seeds each line is the mean over seeds and the shaded band +- one sample s.d.
"""
import math
import statistics
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from config import METHODS, NOISY_READOUT_T  # noqa: E402
from data import CIFAR_CLASSES  # noqa: E402
from machinery import read_log  # noqa: E402

COLOURS = dict(umd=(214, 39, 40), mae=(31, 119, 180), dit=(44, 160, 44),
               maskdit=(148, 103, 189))  # matplotlib's tab10
try:
    FONT = ImageFont.load_default(13)  # a scalable font, built in since Pillow 10.1
except TypeError:  # older Pillow: its small bitmap font (text anchors are then ignored)
    FONT = ImageFont.load_default()
PICTURE_PER_CLASS = 8  # samples per class drawn in compare.png
GRID = (225, 225, 225)
PIXELS = (120, 120, 135)  # the raw-pixel probe's dashes: a grey that no text's edge makes


# ----------------------------------------------------------------------------- axes
def ticks(values, n=5):
    """Round numbers 1, 2 or 5 x 10^k apart, about n of them, from below to above the values."""
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi - lo < 1e-9 * max(1.0, abs(hi)):  # one value: 10% around it (0 to 1 for 0)
        lo, hi = (0.0, 1.0) if lo == 0 else (lo - 0.1 * abs(lo), hi + 0.1 * abs(hi))
    raw = (hi - lo) / n
    power = 10 ** math.floor(math.log10(raw))
    step = next(s * power for s in (1, 2, 5, 10) if s * power >= raw)
    first = math.floor(lo / step + 1e-9)
    return [round((first + i) * step, 12)
            for i in range(math.ceil(hi / step - 1e-9) - first + 1)]


def labels(ts):
    """Tick labels in one unit with the digits their step needs: 0, 10k, 20k; 0.25, 0.30."""
    step, top = ts[1] - ts[0], max(abs(ts[0]), abs(ts[-1]))
    prefix, scale = next(((p, s) for p, s in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6),
                                              ("k", 1e3)) if top >= s), ("", 1.0))
    decimals = max(0, -math.floor(math.log10(step / scale) + 1e-9))
    return ["0" if v == 0 else f"{v / scale:.{decimals}f}{prefix}" for v in ts]


class Panel:
    """One plot in a box (left, top, right, bottom) of a canvas: the data on round-numbered
    axes, with grid, tick labels, axis titles and a title. y_down puts low values at the top."""

    def __init__(self, canvas, box, xs, ys, title, xlabel, ylabel, y_down=False):
        self.draw, self.box, self.y_down = ImageDraw.Draw(canvas), box, y_down
        self.xt, self.yt = ticks(xs), ticks(ys)
        left, top, right, bottom = box
        d = self.draw
        for v, text in zip(self.xt, labels(self.xt)):
            x = self.x(v)
            d.line([(x, top), (x, bottom)], fill=GRID)
            d.line([(x, bottom), (x, bottom + 4)], fill="black")
            d.text((x, bottom + 6), text, fill="black", font=FONT, anchor="mt")
        for v, text in zip(self.yt, labels(self.yt)):
            y = self.y(v)
            d.line([(left, y), (right, y)], fill=GRID)
            d.line([(left - 4, y), (left, y)], fill="black")
            d.text((left - 6, y), text, fill="black", font=FONT, anchor="rm")
        d.rectangle(box, outline="black")
        d.text((left, top - 36), title, fill="black", font=FONT)
        d.text((left - 4, top - 18), ylabel, fill="black", font=FONT)  # the y axis's title
        d.text(((left + right) / 2, bottom + 24), xlabel, fill="black", font=FONT, anchor="mt")

    def x(self, v):
        left, _, right, _ = self.box
        return left + (v - self.xt[0]) / (self.xt[-1] - self.xt[0]) * (right - left)

    def y(self, v):
        _, top, _, bottom = self.box
        f = (v - self.yt[0]) / (self.yt[-1] - self.yt[0])
        return top + f * (bottom - top) if self.y_down else bottom - f * (bottom - top)

    def band(self, points, colour):
        """points: (x, mean, s.d. or None): mean +- s.d. shaded, where there is a s.d."""
        band = [p for p in points if p[2] is not None]
        if len(band) > 1:
            tint = tuple(c + (255 - c) * 3 // 4 for c in colour)  # the colour, mostly white
            self.draw.polygon([(self.x(x), self.y(m + s)) for x, m, s in band]
                              + [(self.x(x), self.y(m - s)) for x, m, s in band[::-1]], fill=tint)

    def curve(self, points, colour, dot=3):
        """points: (x, mean, s.d. or None): the line of the means, a dot on each."""
        xy = [(self.x(x), self.y(m)) for x, m, _ in points]
        if len(xy) > 1:
            self.draw.line(xy, fill=colour, width=2)
        for x, y in xy:
            self.draw.ellipse([x - dot, y - dot, x + dot, y + dot], fill=colour)

    def dashed(self, y, dash=6):
        """A level across the plot, in dashes (the raw-pixel probe)."""
        left, _, right, _ = self.box
        for x in range(left, right, 2 * dash):
            self.draw.line([(x, self.y(y)), (min(x + dash, right), self.y(y))], fill=PIXELS,
                           width=2)

    def point(self, x, y, x_sd, y_sd, colour, label, cap=4):
        """A dot with its error bars (+- s.d., where there is one) and a label."""
        px, py = self.x(x), self.y(y)
        if x_sd:
            self.draw.line([(self.x(x - x_sd), py), (self.x(x + x_sd), py)], fill=colour)
            for v in (x - x_sd, x + x_sd):
                self.draw.line([(self.x(v), py - cap), (self.x(v), py + cap)], fill=colour)
        if y_sd:
            self.draw.line([(px, self.y(y - y_sd)), (px, self.y(y + y_sd))], fill=colour)
            for v in (y - y_sd, y + y_sd):
                self.draw.line([(px - cap, self.y(v)), (px + cap, self.y(v))], fill=colour)
        self.draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour)
        self.draw.text((px + 7, py - 16), label, fill="black", font=FONT)


# ----------------------------------------------------------------------------- curves.png
def read_run(run_dir, batch_size):
    """A pre-training's curves from its log.jsonl: probe (EMA, %) and loss against images, and
    the raw-pixel probe (%, or None)."""
    log = read_log(Path(run_dir) / "log.jsonl")
    return dict(probe=[(r["step"] * batch_size, 100 * r["probe_ema"]) for r in log
                       if "probe_ema" in r],
                loss=[(r["step"] * batch_size, r["loss"]) for r in log if "loss" in r],
                pixels=next((100 * r["probe_pixels"] for r in log if "probe_pixels" in r), None))


def mean_curve(series):
    """Lists of (x, y), one per seed -> (x, mean, sample s.d. where two or more seeds have x)."""
    at = {}
    for points in series:
        for x, y in points:
            at.setdefault(x, []).append(y)
    return [(x, statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else None)
            for x, v in sorted(at.items())]


def figure(runs, batch_size, flops, note, plot=(340, 230)):
    """curves.png: runs = {method: [its pre-training folder in each seed]}, flops = {method:
    training FLOPs per image}; note, a line under the plots (the settings)."""
    curves = {m: [read_run(d, batch_size) for d in dirs] for m, dirs in runs.items()}
    probe = {m: mean_curve([c["probe"] for c in cs]) for m, cs in curves.items()}
    by_flops = {m: [(x * flops[m], mu, s) for x, mu, s in pts] for m, pts in probe.items()}
    loss = {m: mean_curve([c["loss"] for c in cs]) for m, cs in curves.items()}
    pixels = next((c["pixels"] for cs in curves.values() for c in cs if c["pixels"] is not None),
                  None)
    w, h = plot
    canvas = Image.new("RGB", (3 * (w + 90) + 20, h + 180), "white")
    probe_label = "probe % (100-shot ridge, EMA weights)"
    plots = [  # title, curves, x axis, y axis, whether it is the probe
        ("(a) in-training probe against training images", probe, "training images", probe_label,
         True),
        ("(b) in-training probe against training FLOPs", by_flops, "training FLOPs",
         probe_label, True),
        ("(c) training loss against training images", loss, "training images",
         "loss (each method's own)", False),
    ]
    for i, (title, data, xlabel, ylabel, is_probe) in enumerate(plots):
        floor = [pixels] if is_probe and pixels is not None else []
        xs = [0.0] + [p[0] for pts in data.values() for p in pts]  # training starts at 0
        ys = floor + [p[1] + sign * (p[2] or 0)
                      for pts in data.values() for p in pts for sign in (-1, 1)]
        left = 70 + i * (w + 90)
        panel = Panel(canvas, (left, 60, left + w, 60 + h), xs, ys, title, xlabel, ylabel)
        for v in floor:
            panel.dashed(v)
        if not any(data.values()):
            panel.draw.text((left + 10, 70), "no records in the logs" + (
                " (--probe-every 0)" if is_probe else ""), fill="black", font=FONT)
        for m, pts in data.items():  # every band first: no band hides a line
            panel.band(pts, COLOURS[m])
        for m, pts in data.items():
            panel.curve(pts, COLOURS[m], dot=3 if is_probe else 2)
    legend(canvas, runs, pixels is not None, 60 + h + 56)
    ImageDraw.Draw(canvas).text((70, 60 + h + 100), note, fill="black", font=FONT)
    return canvas


def legend(canvas, runs, pixels, top):
    """One line per method, its colour and seeds; then what the dashes and bands are."""
    d, x = ImageDraw.Draw(canvas), 70
    for m, dirs in runs.items():
        label = m + (f" (probe at t={NOISY_READOUT_T})" if METHODS[m]["r_t0"] == 0 else "")
        label += f", {len(dirs)} seed{'s' * (len(dirs) != 1)}"
        d.line([(x, top + 7), (x + 24, top + 7)], fill=COLOURS[m], width=4)
        d.text((x + 30, top), label, fill="black", font=FONT)
        x += 44 + int(d.textlength(label, font=FONT))
    notes = (["grey dashes: the same probe of raw pixels"] if pixels else []) + [
        "line: mean over seeds; shaded: +- 1 sample s.d. (two or more seeds); "
        "k, M, G, T, P: 10^3, 10^6, 10^9, 10^12, 10^15"]
    d.text((70, top + 22), "; ".join(notes), fill="black", font=FONT)


# ----------------------------------------------------------------------------- compare.png
def scatter(points, xlabel, ylabel, title, size=(260, 240)):
    """points: (method, x, x s.d. or None, y, y s.d. or None), one dot per method with error
    bars; low y at the top (for FID, up is better). The PIL image."""
    w, h = size
    canvas = Image.new("RGB", (w + 130, h + 110), "white")
    panel = Panel(canvas, (70, 50, 70 + w, 50 + h),
                  [p[1] + s * (p[2] or 0) for p in points for s in (-1, 1)],
                  [p[3] + s * (p[4] or 0) for p in points for s in (-1, 1)],
                  title, xlabel, ylabel, y_down=True)
    for m, x, x_sd, y, y_sd in points:
        panel.point(x, y, x_sd, y_sd, COLOURS[m], m)
    return canvas


def picture(out, methods, extra=None, label_w=70, gap=12):
    """compare.png: per method, side by side, its fine-tuned samples (one row per class) above the
    reconstructions of its pre-trained network (train.py's reconstruction.png); then `extra`.
    None before any samples."""
    panels = []
    for m in methods:
        d = out / m
        if not (d / "samples.npz").exists():
            continue
        with np.load(d / "samples.npz") as data:
            samples = data["samples"]
        per = len(samples) // len(CIFAR_CLASSES)
        tiles = samples.reshape(len(CIFAR_CLASSES), per, *samples.shape[1:])[:, :PICTURE_PER_CLASS]
        h, w = tiles.shape[2:4]
        grid = Image.new("RGB", (PICTURE_PER_CLASS * (w + 2), len(CIFAR_CLASSES) * (h + 2)),
                         "white")
        for c, row in enumerate(tiles):
            for k, tile in enumerate(row):
                grid.paste(Image.fromarray(tile), (k * (w + 2), c * (h + 2)))
        parts = [grid]
        if (d / "pretrain" / "reconstruction.png").exists():
            rec = Image.open(d / "pretrain" / "reconstruction.png").convert("RGB")
            parts.append(rec.crop((0, 0, rec.width, min(rec.height, 4 * (h + 2) + 2))))
        panels.append((m, parts))
    if not panels:
        return None
    width = max(max(p.width for p in parts) for _, parts in panels)
    height = 20 + max(sum(p.height + gap for p in parts) for _, parts in panels)
    canvas = Image.new(
        "RGB", (label_w + len(panels) * (width + gap) + (extra.width if extra else 0), height),
        "white")
    if extra:
        canvas.paste(extra, (label_w + len(panels) * (width + gap), 20))
    draw = ImageDraw.Draw(canvas)
    h = panels[0][1][0].height // len(CIFAR_CLASSES)
    for c, name in enumerate(CIFAR_CLASSES):
        draw.text((4, 20 + c * h + h // 3), name, fill="black")
    draw.text((4, 20 + panels[0][1][0].height + gap),
              "pre-trained:\nmasked and\nnoised\ninputs,\npredictions", fill="black")
    for i, (m, parts) in enumerate(panels):
        x, y = label_w + i * (width + gap), 20
        draw.text((x, 4), m, fill="black")
        for p in parts:
            canvas.paste(p, (x, y))
            y += p.height + gap
    return canvas
