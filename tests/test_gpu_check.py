"""tools/gpu_check.sh tested on the CPU: its smoke mode runs every stage at toy size; a stage that
fails or runs out of time is recorded and the next one still runs; nothing over 16 MiB is left in
the output folder; bad data is one line."""
import json
import os
import subprocess

from conftest import ROOT, THREADS, shallow_env, write_cifar

STAGES = ["machine", "bench", "train", "tests"]


def gpu_check(data, out, timeout=300, **env):
    env = dict(os.environ, CPU_SMOKE="1", OMP_NUM_THREADS=str(THREADS), **env)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.run(["bash", "tools/gpu_check.sh", str(data), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def part_of_cifar(tmp_path):
    """What travels to a GPU machine: data_batch_1 and test_batch only."""
    data = tmp_path / "data"
    write_cifar(data)
    for i in range(2, 6):
        (data / "cifar-10-batches-py" / f"data_batch_{i}").unlink()
    return data


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", "tools/gpu_check.sh"], cwd=ROOT).returncode == 0


def test_cpu_smoke_runs_every_stage(tmp_path):
    out = tmp_path / "out"
    r = gpu_check(part_of_cifar(tmp_path), out, **shallow_env(tmp_path))  # 2 blocks compile as 6
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "GPU CHECK PASSED" in r.stdout
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["passed"] and report["mode"] == "cpu-smoke" and list(report["stages"]) == STAGES
    stages = report["stages"]
    assert all(s["status"] == "pass" and s["seconds"] > 0 for s in stages.values()), stages
    assert stages["machine"]["numbers"]["compile"] == "ok"
    runs = {r["label"]: r for r in stages["bench"]["numbers"]["runs"]}
    assert list(runs) == ["umd", "dit", "umd eager"]
    assert (runs["umd"]["graphs"], runs["dit"]["graphs"], runs["umd eager"]["graphs"]) == (2, 1, None)
    assert all(runs[k]["recompiles"] == 0 and runs[k]["graph_breaks"] == 0 for k in ("umd", "dit"))
    assert [r["compiled"] for r in runs.values()] == [True, True, False]
    assert all(r["img_s"] > 0 and r["first_step_s"] > 0 and r["loss"] > 0 for r in runs.values())
    train = stages["train"]["numbers"]
    assert train["steps"] == 8 and train["steady"] and train["intervals_after_first"] == 3
    assert train["img_per_s_median"] > 0 and train["loss_last"] > 0
    assert "skipped" in stages["tests"]["numbers"]["summary"]  # no CUDA here
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("# GPU check: PASSED") and "| umd eager |" in md and "data_batch_5" in md
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix == ".pt"] and max(p.stat().st_size for p in files) < 16 * 2 ** 20


def test_a_stage_out_of_time_is_recorded_and_the_next_one_runs(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / "old.log", "wb") as f:  # left over, too big to bring back from a GPU machine
        f.truncate(17 * 2 ** 20)
    r = gpu_check(part_of_cifar(tmp_path), out, GPU_CHECK_LIMITS="1 1 1 60")
    assert r.returncode == 1 and "GPU CHECK FAILED" in r.stderr
    stages = json.loads((out / "gpu_check.json").read_text())["stages"]
    assert [stages[k]["status"] for k in STAGES] == ["timeout", "timeout", "timeout", "pass"]
    assert (out / "gpu_check.md").read_text().startswith("# GPU check: FAILED")
    assert (out / "old.log").stat().st_size <= 2 ** 20 + 100


def test_missing_data_is_one_line_and_exit_2(tmp_path):
    r = gpu_check(tmp_path / "nowhere", tmp_path / "out", timeout=30)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = gpu_check(tmp_path, tmp_path / "out", timeout=30)
    assert r.returncode == 2 and "data_batch_1" in r.stderr and len(r.stderr.strip().splitlines()) == 1
