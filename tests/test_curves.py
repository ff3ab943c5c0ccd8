"""tools/curves.py: axes with round ticks, curves read from hand-written log.jsonl files, and
curves.png drawn from them."""
import json
import statistics

import pytest
from PIL import Image

from tools import curves
from tools.curves import COLOURS


def write_log(folder, records):
    folder.mkdir(parents=True)
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def toy_log(probes, losses, pixels=0.2):
    """train.py's records: the probes at step 0 (with raw pixels), 10 and 20; losses at 5..20."""
    recs = [{"step": 0, "epoch": 0.0, "probe_pixels": pixels, "probe": 0.1, "probe_ema": probes[0]}]
    for step, loss in zip((5, 10, 15, 20), losses):
        rec = {"step": step, "epoch": step / 20, "loss": loss, "lr": 1e-3, "img_per_s": 100.0}
        if step in (10, 20):
            rec.update(probe=0.3, probe_ema=probes[step // 10])
        recs.append(rec)
    return recs


def test_ticks_are_round_and_cover_the_values():
    assert curves.ticks([0, 47]) == [0, 10, 20, 30, 40, 50]
    assert curves.ticks([78.9, 86.1]) == [78, 80, 82, 84, 86, 88]
    assert curves.ticks([0]) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]  # one value: 0 to 1
    assert curves.ticks([30]) == [26, 28, 30, 32, 34]  # one value: 10% around it
    assert curves.labels(curves.ticks([0, 45.5e12])) == ["0", "10T", "20T", "30T", "40T", "50T"]
    assert curves.labels([1.265, 1.27, 1.275]) == ["1.265", "1.270", "1.275"]  # digits of the step
    assert curves.labels([0, 2000, 4000]) == ["0", "2k", "4k"]


def test_a_panel_maps_data_to_pixels():
    canvas = Image.new("RGB", (400, 300), "white")
    panel = curves.Panel(canvas, (100, 50, 300, 250), [0, 40], [10, 30], "t", "x", "y")
    assert (panel.x(0), panel.x(20), panel.x(40)) == (100, 200, 300)
    assert (panel.y(10), panel.y(30)) == (250, 50)  # up is more
    panel.curve([(0, 10, None), (20, 20, None), (40, 30, None)], COLOURS["umd"])
    assert canvas.getpixel((200, 150)) == COLOURS["umd"]
    flipped = curves.Panel(canvas, (100, 50, 300, 250), [0, 40], [10, 30], "t", "x", "y",
                           y_down=True)
    assert (flipped.y(10), flipped.y(30)) == (50, 250)  # for FID: low at the top


def test_a_run_and_the_mean_over_seeds(tmp_path):
    run = write_log(tmp_path / "umd", toy_log([0.1, 0.25, 0.3], [0.9, 0.7, 0.6, 0.5]))
    c = curves.read_run(run, batch_size=32)
    assert c["probe"] == [(0, 10.0), (320, 25.0), (640, 30.0)]  # images = step * batch, in %
    assert c["loss"] == [(160, 0.9), (320, 0.7), (480, 0.6), (640, 0.5)]
    assert c["pixels"] == 20.0
    mean = curves.mean_curve([[(0, 10.0), (320, 20.0)], [(0, 12.0), (320, 20.0), (640, 30.0)]])
    assert mean == [(0, 11.0, pytest.approx(statistics.stdev([10, 12]))), (320, 20.0, 0.0),
                    (640, 30.0, None)]  # a point one seed has: no s.d.


def test_curves_png_from_hand_written_logs(tmp_path):
    runs = {}
    for seed, shift in ((0, 0.0), (1, 0.04)):
        runs.setdefault("umd", []).append(write_log(
            tmp_path / f"s{seed}" / "umd", toy_log([0.1, 0.25 + shift, 0.3 + shift], [0.9, 0.7, 0.6, 0.5])))
        runs.setdefault("dit", []).append(write_log(
            tmp_path / f"s{seed}" / "dit", toy_log([0.1, 0.2, 0.22 + shift], [0.8, 0.75, 0.7, 0.65])))
    img = curves.figure(runs, 32, {"umd": 1e9, "dit": 2e9}, "a note").convert("RGB")
    assert img.size == (1310, 410)
    counts = {colour: n for n, colour in img.getcolors(img.width * img.height)}
    for m in ("umd", "dit"):
        assert counts[COLOURS[m]] > 300  # three plots of lines and dots, and the legend
        tint = tuple(c + (255 - c) * 3 // 4 for c in COLOURS[m])
        assert counts.get(tint, 0) > 50  # the band of +- 1 s.d. over the two seeds
    assert counts[curves.PIXELS] > 200  # the raw-pixel probe's dashes in (a) and (b)
    assert counts[(255, 255, 255)] < 0.93 * img.width * img.height  # not blank: axes alone leave 94.5%
    # (a) probe against images: umd's last mean, (30 + 34) / 2 = 32% at 640 images, on its line
    a = curves.Panel(Image.new("RGB", img.size), (70, 60, 410, 290), [0, 640], [10, 34.8], "", "", "")
    assert a.yt == [10, 15, 20, 25, 30, 35]  # 10% (step 0) to umd's 32 + 2.8 (its s.d.)
    assert img.getpixel((round(a.x(640)), round(a.y(32)))) == COLOURS["umd"]


def test_logs_without_probes_still_draw_the_loss(tmp_path):
    run = write_log(tmp_path / "mae", [{"step": 10, "loss": 0.5}, {"step": 20, "loss": 0.4}])
    img = curves.figure({"mae": [run]}, 32, {"mae": 1e9}, "no probes").convert("RGB")
    counts = {colour: n for n, colour in img.getcolors(img.width * img.height)}
    assert counts[COLOURS["mae"]] > 50 and curves.PIXELS not in counts  # no pixel probe: no dashes
