"""tools/compare.py end to end at toy size: four methods, every stage, the summary, stopping and
going on without redoing finished stages, several seeds, and bad input."""
import json
import os
import shutil
import statistics
import sys

import pytest
import torch

import config
import train
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
import compare  # noqa: E402

# 200 training images, batch 32: 6 steps per epoch; 12 steps of pre-training, 3 of fine-tuning; no in-training
# probe (it takes 100 images of every class, the toy data have 20)
TOY = ["--model", "tiny", "--patch-size", "8", "--batch-size", "32", "--finetune-batch-size", "32", "--epochs", "2",
       "--finetune-epochs", "0.5", "--fid", "20", "--fid-steps", "2", "--shots", "5", "--preset", "cpu",
       "--probe-every", "0"]
METHODS = ["umd", "mae", "dit", "maskdit"]
pytestmark = pytest.mark.usefixtures("shallow")  # conftest.SHALLOW: a third of the training


def run(out, cifar_dir, *extra):
    return compare.main([*TOY, "--data-dir", str(cifar_dir), "--out", str(out), *map(str, extra)])


@pytest.fixture(scope="module")
def finished(cifar_dir, standin, tmp_path_factory):
    """A comparison that was stopped in the middle of the dit fine-tune, then run again."""
    out = tmp_path_factory.mktemp("cmp") / "toy"
    real, calls = compare.stage_finetune, []

    def stopped_in_dit(m, d, args, ds):
        calls.append(m)
        if m == "dit":
            raise KeyboardInterrupt
        return real(m, d, args, ds)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UMD_INCEPTION", str(standin))  # the stand-in network scores FID
        mp.setattr(compare, "stage_finetune", stopped_in_dit)
        assert run(out, cifar_dir) == 130
        done_before = {p: p.stat().st_mtime_ns for p in out.glob("*/*.json")}
        assert calls == ["umd", "mae", "dit"] and not (out / "dit" / "finetune.json").exists()
        mp.setattr(compare, "stage_finetune", real)
        assert run(out, cifar_dir) == 0
    return out, done_before


def test_every_stage_and_the_summary(finished):
    out, _ = finished
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["umd", "mae", "dit", "maskdit"]
    for m, r in results["methods"].items():
        assert r["pretrain"]["steps"] == 12 and r["finetune"]["steps"] == 3 and r["pretrain"]["img_per_s"] > 0
        assert 0 <= r["probe"]["linear"]["top1"] <= 1 and r["probe"]["fewshot"]["shots"] == 5
        assert ("probe-t50" in r) == (m in ("dit", "maskdit"))  # their official read-out
        assert r["samples"]["n"] == 20 and r["fid"]["n"] == 20 and r["fid"]["fid"] > 0
    assert results["settings"]["epochs"] == 2.0 and results["machine"]["cores"] >= 1
    c = json.loads((out / "umd" / "pretrain" / "config.json").read_text())  # how it trained: said
    how = ("bf16 autocast" if c["amp"] == "bf16" else "float32") + (", compiled" if c["compile"] else ", eager")
    assert results["methods"]["umd"]["pretrain"]["precision"] == how and how in (out / "table.md").read_text()
    flops = {m: r["gflop_per_image"] for m, r in results["methods"].items()}
    assert flops["mae"] < flops["umd"] < flops["dit"]  # the encoder sees fewer tokens
    rows = [l for l in (out / "table.md").read_text().splitlines() if l.startswith("| ") and "method" not in l]
    assert [r.split("|")[1].strip() for r in rows] == ["umd", "mae", "dit", "maskdit"]
    assert rows[2].split("|")[8].strip() == "1.00x" and "t=50" in rows[2]
    from PIL import Image
    assert Image.open(out / "compare.png").width > 4 * 8 * 34  # four panels of 8 samples per class


def test_going_on_redoes_no_finished_stage(finished):
    out, done_before = finished
    for path, mtime in done_before.items():
        assert path.stat().st_mtime_ns == mtime, path
    for m in ("umd", "mae", "dit", "maskdit"):  # one uninterrupted log per training run
        steps = [json.loads(l)["step"] for l in (out / m / "pretrain" / "log.jsonl").read_text().splitlines()]
        assert steps == sorted(set(steps)) and steps[-1] == 12


def test_an_interrupted_training_resumes(cifar_dir, tmp_path):
    out = tmp_path / "cmp"
    # what a Ctrl-C at step 4 of the first pre-training leaves behind: a checkpoint at step 4
    argv = ["--method", "umd", "--recipe", "cpu", "--model", "tiny", "--patch-size", "8", "--batch-size", "32",
            "--lr", "1e-3", "--epochs", "2", "--seed", "0", "--probe-every", "0", "--device", "cpu",
            "--data-dir", str(cifar_dir), "--out", str(out / "umd" / "pretrain"), "--max-steps", "4"]
    assert train.train(config.get_args(argv)) == 0
    assert run(out, cifar_dir, "--methods", "umd", "--fid", "0") == 0
    log = [json.loads(l) for l in (out / "umd" / "pretrain" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [4, 12]  # continued from the checkpoint, not restarted
    assert torch.load(out / "umd" / "pretrain" / "ckpt.pt", weights_only=True)["step"] == 12


@pytest.mark.parametrize("extra,message", [
    (["--methods", "umd,vae"], "unknown method vae"),
    (["--data-dir", "{tmp}/nodata"], "CIFAR-10 not found"),
    (["--patch-size", "5"], "must divide"),
    (["--shots", "0"], "--shots must be in 1..5000"),
    (["--finetune-ema-decay", "1"], "--finetune-ema-decay"),
    (["--probe-images", "45"], "--probe-images must be a multiple"),
    (["--lr", "nan"], "--lr nan is not a finite number"),
    (["--finetune-epochs", "inf"], "--finetune-epochs inf is not a finite number"),
    (["--cfg-scale=-inf"], "--cfg-scale -inf is not a finite number"),
    (["--fid-steps", "1001"], "--fid-steps in 1..1000"),
    (["--epochs", "0"], "the epochs positive"),
    (["--probe-every", "-1"], "--probe-every >= 0"),
    (["--seeds", "0,x"], "--seeds 0,x: give whole numbers"),
    (["--seeds", "0,1,0"], "give distinct seeds"),
    (["--seed", "1", "--seeds", "0,1"], "the first the --seed"),
    (["--stages", "pretrain,bogus"], "--stages pretrain,bogus: choose from"),
])
def test_bad_input_is_one_line_and_exit_2(extra, message, cifar_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("data.CIFAR_URL", "http://127.0.0.1:9/cifar.tar.gz")
    argv = [*TOY, "--data-dir", str(cifar_dir), "--out", str(tmp_path / "x"), *[a.format(tmp=tmp_path) for a in extra]]
    assert compare.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "x" / "settings.json").exists()  # a typo does not claim the folder


def test_a_folder_of_another_comparison_is_refused_and_kept(finished, cifar_dir, capsys):
    out, _ = finished
    before = (out / "results.json").read_bytes()
    assert run(out, cifar_dir, "--epochs", "3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0] and "--epochs 2.0 -> 3.0" in err[0]
    assert (out / "results.json").read_bytes() == before and (out / "umd" / "pretrain" / "ckpt.pt").exists()


def test_a_run_with_fewer_methods_keeps_the_others_in_the_summary(finished, cifar_dir):
    out, _ = finished
    assert run(out, cifar_dir, "--methods", "umd") == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["umd", "mae", "dit", "maskdit"]
    assert all(r["pretrain"]["machine"]["cores"] >= 1 for r in results["methods"].values())  # where each ran
    assert len([l for l in (out / "table.md").read_text().splitlines() if l.startswith("| ")]) == 1 + 4  # the head and 4 rows


def test_a_comparison_goes_on_with_its_own_preset(tmp_path):
    (tmp_path / "settings.json").write_text(json.dumps({"preset": "gpu"}))
    args = compare.get_args(["--out", str(tmp_path), "--device", "cpu"])  # e.g. FID of a GPU run on a CPU
    assert args.preset == "gpu" and args.model == "small" and args.fid == 10000 and args.device == "cpu"
    assert compare.get_args(["--out", str(tmp_path / "new")]).preset == ("gpu" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("damaged", [b'{"preset": "cp', b"[]", b"\xff\xfe\x00"])
def test_a_damaged_settings_file_is_one_line_and_kept(damaged, tmp_path, cifar_dir, capsys):
    (tmp_path / "settings.json").write_bytes(damaged)
    assert compare.main(["--out", str(tmp_path), "--data-dir", str(cifar_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "settings.json is damaged" in err[0]
    assert (tmp_path / "settings.json").read_bytes() == damaged


def test_the_probes_learn_from_an_equal_number_of_images_per_class(finished, cifar_dir, monkeypatch):
    out, _ = finished
    args = compare.get_args([*TOY, "--probe-images", "100", "--data-dir", str(cifar_dir), "--out", str(out)])
    ds = compare.load_dataset("cifar10", args.data_dir)
    seen = []
    monkeypatch.setattr(compare, "evaluate", lambda f, y, *a, **k: (seen.append((f, y)), ({}, []))[1])
    r = compare.stage_probe("umd", out / "umd", args, ds)
    (f, y), = seen
    assert r["train_images"] == len(f) == 100 and y.bincount(minlength=10).tolist() == [10] * 10
    assert compare.get_args(["--epochs", "0.5"]).probe_images == 5000  # a smoke run: a smaller probe
    assert compare.get_args(["--epochs", "0.5", "--shots", "600"]).probe_images == 12000  # 2 x shots per class
    assert compare.get_args(["--epochs", "1"]).probe_images == 50000


def test_out_at_or_under_a_file_is_one_line_and_exit_2(tmp_path, cifar_dir, capsys):
    (tmp_path / "file").write_text("not a folder")
    for out, message in [(tmp_path / "file", "is a file; pass a folder"), (tmp_path / "file" / "cmp", "Not a directory")]:
        assert run(out, cifar_dir) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert (tmp_path / "file").read_text() == "not a folder"


def test_a_full_disk_is_one_line_after_the_table_is_shown(finished, cifar_dir, capsys, monkeypatch):
    out, _ = finished

    def full(obj, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(compare, "save_atomic", full)
    assert run(out, cifar_dir) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "free some space" in err[0], err
    assert "| umd |" in captured.out  # every number was on the screen before the write failed


def test_every_training_starts_with_an_empty_compile_cache(cifar_dir, tmp_path, monkeypatch):
    """Eight trainings in one process: without a clean cache each adds its graphs to the same
    forward, and past dynamo's recompile limit (8) the last ones would run uncompiled."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._dynamo.utils import counters
    from model import UMDModel

    real_compile, real_train, seen = torch.compile, train.train, []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, **{**kw, "backend": "aot_eager"}))
    cached = lambda: len(_debug_get_cache_entry_list(UMDModel.forward.__code__))

    def counted(args):
        before, graphs = cached(), counters["stats"]["unique_graphs"]
        code = real_train(args)
        seen.append((before, counters["stats"]["unique_graphs"] - graphs, cached()))
        return code

    monkeypatch.setattr(train, "train", counted)
    monkeypatch.setattr("devices.compile_preflight", lambda device: None)  # its graph is not ours
    torch._dynamo.reset()
    real_compile(torch.nn.Linear(2, 2), backend="aot_eager")(torch.zeros(1, 2))  # something compiled before
    assert run(tmp_path / "cmp", cifar_dir, "--methods", "umd", "--fid", "0", "--compile") == 0
    # pre-training: a noise-free and a noisy group (2 graphs); fine-tune: 1 noise-free image of 32, with labels
    assert seen == [(0, 2, 2), (0, 2, 2)]
    torch._dynamo.reset()


def test_the_gpu_estimate_counts_compile_sampling_and_fid(capsys):
    parts = compare.gpu_estimate(compare.PRESETS["gpu"])
    assert set(parts) == {"pre-training", "fine-tuning", "compilation", "probes", "sampling", "FID", "start-up"}
    assert parts["compilation"] == 11.0  # 5 pre-training graphs and 6 fine-tuning graphs, a minute each
    assert parts["sampling"] > parts["pre-training"] > parts["fine-tuning"] > 0 and parts["FID"] > 1
    assert 20 < sum(parts.values()) < 40
    with pytest.raises(SystemExit):
        compare.get_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "an estimate until a GPU run measures it" in text and "9 minutes" not in text


def test_the_pretrainings_probe_often_enough_for_a_curve(tmp_path, monkeypatch):
    """--probe-every reaches train.py's pre-training (cpu preset: every 0.2 epoch, 6 points in its
    1 epoch), not the fine-tune; it is no setting, so comparisons made before it go on."""
    seen = []
    monkeypatch.setattr(compare, "run_training", lambda run_dir, argv, args: seen.append(argv))
    args = compare.get_args(["--preset", "cpu", "--out", str(tmp_path)])
    compare.stage_pretrain("umd", tmp_path / "umd", args, None)
    compare.stage_finetune("umd", tmp_path / "umd", args, None)
    pre, ft = seen
    assert pre[pre.index("--probe-every") + 1] == 0.2 and ft[ft.index("--probe-every") + 1] == 0
    assert compare.get_args(["--preset", "gpu"]).probe_every == 1.0
    assert compare.get_args(["--preset", "cpu", "--probe-every", "0"]).probe_every == 0
    old = compare.settings(args)
    assert "probe_every" not in old and "seeds" not in old and old["seed"] == 0
    (tmp_path / "settings.json").write_text(json.dumps(old))
    compare.check(compare.get_args(["--out", str(tmp_path), "--probe-every", "0.5"]))  # no error


def counting(calls):
    """Each stage function wrapped to note (seed, method, stage) when it is called."""
    def wrap(name, real):
        def stage(m, d, args, ds, **kw):
            calls.append((args.seed, m, name))
            return real(m, d, args, ds, **kw)
        return stage
    return {f"stage_{n}": wrap(n, getattr(compare, f"stage_{n}"))
            for n in ("pretrain", "probe", "finetune", "samples", "fid")}


def summary_line_names(out, text):
    """The files that the summary line says it wrote: exactly those in the folder."""
    line = next(l for l in text.splitlines() if l.startswith(f"{out}: results.json"))
    said = sorted(line.split(": ", 1)[1].split(", "))
    assert said == sorted(p.name for p in out.iterdir() if p.suffix in (".json", ".md", ".png")
                          and p.name != "settings.json")
    return said


def test_stages_run_the_representations_first_and_the_rest_later(cifar_dir, tmp_path, monkeypatch,
                                                                   capsys):
    calls = []
    for name, stage in counting(calls).items():
        monkeypatch.setattr(compare, name, stage)
    assert run(tmp_path, cifar_dir, "--methods", "dit", "--fid", "0", "--stages", "pretrain,probe") == 0
    assert "compare.png" not in summary_line_names(tmp_path, capsys.readouterr().out)  # no samples
    assert calls == [(0, "dit", "pretrain"), (0, "dit", "probe"), (0, "dit", "probe")]  # t=50 too
    assert not (tmp_path / "dit" / "finetune").exists()
    assert "| dit |" in (tmp_path / "table.md").read_text()  # the summary of what there is
    del calls[:]
    assert run(tmp_path, cifar_dir, "--methods", "dit", "--fid", "0") == 0
    assert calls == [(0, "dit", "finetune"), (0, "dit", "samples")]


# ----------------------------------------------------------------------------- several seeds
@pytest.fixture(scope="module")
def two_seeds(finished, cifar_dir, standin, tmp_path_factory):
    """The finished single-seed comparison, copied without its checkpoints (only stages still to do
    read them), grown to --seeds 0,1, then the same command again. Returns the folder, the stages
    each run called, and the files (with mtimes) before each run."""
    out = tmp_path_factory.mktemp("seeds") / "toy"
    shutil.copytree(finished[0], out, ignore=shutil.ignore_patterns("ckpt.pt"))  # mtimes kept
    calls, runs, before = [], [], []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UMD_INCEPTION", str(standin))
        for name, stage in counting(calls).items():
            mp.setattr(compare, name, stage)
        for _ in range(2):
            before.append({p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()})
            called = len(calls)
            assert run(out, cifar_dir, "--seeds", "0,1") == 0
            runs.append(calls[called:])
    return out, runs, before


def test_a_second_seed_keeps_the_first_where_one_seed_puts_it(two_seeds):
    out, (first, again), (before, _) = two_seeds
    # seed 0 stays in OUT/<method>, untouched; seed 1 is a whole comparison in OUT/seed-1/<method>
    for path, mtime in before.items():
        if path.parent != out:  # the summary files are rewritten
            assert path.stat().st_mtime_ns == mtime, path
    stages = [(m, s) for m in METHODS for s in ("pretrain", "probe") + ("probe",) * (m in ("dit", "maskdit"))
              + ("finetune", "samples", "fid")]
    assert first == [(1, m, s) for m, s in stages]  # 22 stages, all of seed 1
    for m in METHODS:
        assert json.loads((out / "seed-1" / m / "pretrain.json").read_text())["steps"] == 12
        config = json.loads((out / "seed-1" / m / "pretrain" / "config.json").read_text())
        assert config["seed"] == 1 and config["probe_every"] == 0
    assert json.loads((out / "settings.json").read_text())["seed"] == 0  # the folder's own seed


def test_the_same_command_again_redoes_nothing(two_seeds):
    out, (_, again), (_, before) = two_seeds
    assert again == []
    for path, mtime in before.items():
        if path.parent != out:  # every stage's file of both seeds, checkpoints included
            assert path.stat().st_mtime_ns == mtime, path


def cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_two_seeds_make_one_table_with_spread_and_paired_differences(two_seeds, finished):
    out, _, _ = two_seeds
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1] and list(results["per_seed"]) == ["0", "1"]
    seeds = [results["per_seed"][k] for k in ("0", "1")]
    fewshot = lambda r, stage="probe": 100 * r[stage]["fewshot"]["mean"]
    text = (out / "table.md").read_text()
    assert text.startswith("Mean ± s.d. over 2 seeds (0, 1; the sample s.d.)")
    mean_table, paired, seed0, seed1 = [[cells(l) for l in block.splitlines() if l.startswith("| ")]
                                        for block in text.split("\n\n") if block.startswith("| ")]
    assert [r[0] for r in mean_table[1:]] == METHODS and [r[0] for r in paired[1:]] == METHODS[1:]
    for row in mean_table[1:]:
        values = [fewshot(s[row[0]]) for s in seeds]
        assert row[2].startswith(f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"), row
        fids = [s[row[0]]["fid"]["fid"] for s in seeds]
        assert row[4] == f"{statistics.fmean(fids):.1f} ± {statistics.stdev(fids):.1f}"
        assert results["methods"][row[0]]["fewshot"]["n"] == 2
        assert results["methods"][row[0]]["fewshot"]["mean"] == pytest.approx(statistics.fmean(values))
    for row in paired[1:]:  # method - umd, seed by seed, then mean and s.d. of the differences
        diffs = [fewshot(s[row[0]]) - fewshot(s["umd"]) for s in seeds]
        assert row[2].startswith(f"{statistics.fmean(diffs):+.2f} ± {statistics.stdev(diffs):.2f}"), row
        if row[0] in ("dit", "maskdit"):  # their official read-out, at t=50, against umd's clean probe
            noisy = [fewshot(s[row[0]], "probe-t50") - fewshot(s["umd"]) for s in seeds]
            assert f"(t=50: {statistics.fmean(noisy):+.2f} ± {statistics.stdev(noisy):.2f})" in row[2]
        fid = [s[row[0]]["fid"]["fid"] - s["umd"]["fid"]["fid"] for s in seeds]
        assert row[4] == f"{statistics.fmean(fid):+.1f} ± {statistics.stdev(fid):.1f}"
    # then each seed's own table: seed 0's is the single-seed comparison's
    assert f"## Seed 0 ({out})" in text and f"## Seed 1 ({out / 'seed-1'})" in text
    single = (finished[0] / "table.md").read_text()
    assert seed0 == [cells(l) for l in single.splitlines() if l.startswith("| ")]
    assert [r[0] for r in seed1[1:]] == METHODS and seed1[1][2] == f"{fewshot(seeds[1]['umd']):.2f}"
    assert "seeds 0, 1; probes" in text and single.splitlines()[-1] in text  # the footnotes


def test_two_seeds_draw_their_curves_and_the_probe_against_fid_with_error_bars(two_seeds):
    from PIL import Image
    from tools.curves import COLOURS
    out, _, _ = two_seeds
    img = Image.open(out / "curves.png").convert("RGB")
    assert img.size == (1310, 410)
    counts = {colour: n for n, colour in img.getcolors(img.width * img.height)}
    assert all(counts.get(COLOURS[m], 0) > 0 for m in METHODS)  # each method's loss, mean over the seeds
    picture = Image.open(out / "compare.png").convert("RGB")
    scatter = picture.crop((picture.width - 390, 0, picture.width, 350))  # right of the samples
    counts = {colour: n for n, colour in scatter.getcolors(scatter.width * scatter.height)}
    # a dot is 61 pixels; umd's few-shot probe differs between the seeds (85%, 80%): its bars add more
    assert all(counts.get(COLOURS[m], 0) > 0 for m in METHODS) and counts[COLOURS["umd"]] > 120
