#!/usr/bin/env bash
# The GPU check: one prepared run of at most 8.5 minutes on one H100/H200 (no network needed; at
# most 64 MiB carried to the machine, files of at most 16 MiB brought back). Four stages, in order,
# each under its own time limit; a stage that fails or runs out of time is recorded and the next
# one runs:
#   machine  GPU, torch, Triton, C compiler, and the compile preflight of train.py
#            (tools/bench.py --machine)
#   bench    tools/bench.py, small/2, batch 1024, bf16: umd and dit compiled, umd eager; per run the
#            first step's seconds (compilation included), img/s and MFU over 20 timed steps, peak
#            memory, graphs compiled, recompiles, graph breaks and host-device syncs
#   train    train.py with the default recipe (GPU: small/2, batch 1024, compile, bf16) for 200
#            steps, logging every 20: img/s over the intervals after the first (which holds the
#            step-0 probe and compilation); its checkpoint stays in a temporary folder
#   tests    tests/test_cuda.py, with what is left of the 8.5 minutes (CI runs the CPU suite)
# Then OUT_DIR/gpu_check.md and OUT_DIR/gpu_check.json ("stages": each stage's status, seconds and
# numbers), beside each stage's log. Exit status 0 when every stage passed, else 1.
#
#   bash tools/gpu_check.sh DATA_DIR [OUT_DIR]
#       DATA_DIR/cifar-10-batches-py needs data_batch_1 and test_batch (about 59 MiB); missing
#       training batches are stood in for by data_batch_1 (the summary says so).
#   CPU_SMOKE=1 bash tools/gpu_check.sh DATA_DIR [OUT_DIR]
#       every stage at toy size on a CPU (aot_eager instead of inductor), to test the script itself
#       (tests/test_gpu_check.py runs it).
#   GPU_CHECK_LIMITS="40 220 150 60"   seconds for machine, bench, train, and the least for tests
set -uo pipefail
data=${1:?usage: bash tools/gpu_check.sh DATA_DIR [OUT_DIR]}
out=${2:-${OUT:-gpu_check_out}}
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd) && data=$(cd "$data" 2> /dev/null && pwd) || { echo "gpu_check: no folder $data" >&2; exit 2; }
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
ms() { echo $(( $(date +%s%N) / 1000000 )); }  # the clock in milliseconds
start=$(ms)
total=480  # seconds: the stages' limits never add up to more; with the kill graces, under 8.5 minutes

# A subset of CIFAR-10 travels to the machine: stand in data_batch_1 for missing training batches.
src="$data/cifar-10-batches-py"
[ -f "$src/data_batch_1" ] && [ -f "$src/test_batch" ] || { echo "gpu_check: need $src/data_batch_1 and test_batch" >&2; exit 2; }
work=$(mktemp -d) || exit 2
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/cifar-10-batches-py"
note=""
for f in data_batch_1 data_batch_2 data_batch_3 data_batch_4 data_batch_5 test_batch; do
  if [ -f "$src/$f" ]; then ln -s "$src/$f" "$work/cifar-10-batches-py/$f"
  else ln -s "$src/data_batch_1" "$work/cifar-10-batches-py/$f"; note="$note $f"; fi
done

if [ -n "${CPU_SMOKE:-}" ]; then
  mode=cpu-smoke
  read -r -a limits <<< "${GPU_CHECK_LIMITS:-60 120 120 60}"
  machine=(--device cpu --backend aot_eager)
  bench=(--device cpu --backend aot_eager --compile --model tiny --patch-size 8 --batch-size 8 --steps 2 --warmup 1)
  run=(--device cpu --model tiny --patch-size 8 --batch-size 32 --epochs 2 --max-steps 8 --log-every 2 --probe-every 0)
else
  mode=gpu
  read -r -a limits <<< "${GPU_CHECK_LIMITS:-40 220 150 60}"
  machine=(--device cuda)
  bench=(--device cuda --batch-size 1024 --steps 20 --warmup 3)
  run=(--device cuda --max-steps 200 --log-every 20)  # the default recipe otherwise
fi
: > "$out/stages.tsv"

stage() {  # NAME LIMIT SIGNAL COMMAND...: run it under its limit, log it, record its status
  local name=$1 limit=$2 sig=$3 t0 rc
  shift 3
  echo "gpu_check: $name (limit ${limit} s): $*"
  t0=$(ms)
  # then KILL after a grace: 10 s for train.py to write its checkpoint after SIGINT, 5 s otherwise
  timeout -s "$sig" -k "$([ "$sig" = INT ] && echo 10 || echo 5)" "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(ms) - t0 ))" "$limit" >> "$out/stages.tsv"
  if [ "$rc" != 0 ]; then tail -n 5 "$out/$name.log" | sed "s/^/  $name: /"; fi
  echo "gpu_check: $name ended with status $rc"
}

stage machine "${limits[0]}" TERM "$py" tools/bench.py --machine --json "$out/machine.json" "${machine[@]}"
stage bench "${limits[1]}" TERM "$py" tools/bench.py --runs umd,dit,umd:eager --json "$out/bench.json" "${bench[@]}"
# SIGINT at the limit: train.py finishes its step, saves and stops; its log keeps what it measured
stage train "${limits[2]}" INT "$py" train.py --dataset cifar10 --data-dir "$work" --out "$work/run" "${run[@]}"
mkdir -p "$out/train"
for f in config.json log.jsonl reconstruction.png; do
  [ -f "$work/run/$f" ] && cp "$work/run/$f" "$out/train/"
done
left=$(( total - ($(ms) - start) / 1000 ))
[ "$left" -lt "${limits[3]}" ] && left=${limits[3]}
stage tests "$left" TERM "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py

"$py" - "$out" "$mode" "$note" "$(( $(ms) - start ))" <<'EOF'
"""gpu_check.md and gpu_check.json from the stages' records, logs and JSON files."""
import json, statistics, sys
from pathlib import Path

sys.path.insert(0, ".")
from machinery import read_log, save_atomic, write_json
from tools.bench import step_flops

out, mode, note, seconds = Path(sys.argv[1]), sys.argv[2], sys.argv[3].strip(), int(sys.argv[4]) / 1000
MAX_FILE = 16 * 2 ** 20
load = lambda p: json.loads(p.read_text()) if p.exists() else None
stages = {}
for line in (out / "stages.tsv").read_text().splitlines():
    name, rc, secs, limit = line.split("\t")
    status = "pass" if rc == "0" else "timeout" if rc in ("124", "137") else f"fail (exit {rc})"
    stages[name] = dict(status=status, exit=int(rc), seconds=round(int(secs) / 1000, 1), limit=int(limit), numbers={})

machine = load(out / "machine.json")
if machine and "machine" in stages:
    stages["machine"]["numbers"] = machine
bench = load(out / "bench.json")
if bench and "bench" in stages:
    stages["bench"]["numbers"] = bench
if "train" in stages:  # img/s after the first log interval, which holds start-up, probe and compile
    log = read_log(out / "train" / "log.jsonl")  # a line cut by the kill is skipped
    cfg = load(out / "train" / "config.json") or {}
    steps = [r for r in log if "img_per_s" in r]
    steady = [r["img_per_s"] for r in steps[1:]]
    n = dict(steps=steps[-1]["step"] if steps else 0, intervals_after_first=len(steady),
             steady=len(steady) >= 3, img_per_s_first_interval=steps[0]["img_per_s"] if steps else None,
             img_per_s_median=statistics.median(steady) if steady else None,
             img_per_s_range=[min(steady), max(steady)] if steady else None,
             loss_first=steps[0]["loss"] if steps else None, loss_last=steps[-1]["loss"] if steps else None,
             probes=[{k: r[k] for k in ("step", "probe", "probe_ema", "probe_pixels") if k in r}
                     for r in log if "probe" in r],
             config={k: cfg.get(k) for k in ("method", "model", "patch_size", "batch_size", "amp", "compile", "device")})
    peak = (machine or {}).get("peak_bf16_tflops")
    if cfg and steady:
        gflop = step_flops(cfg["model"], cfg["patch_size"], cfg["r_t0"], cfg["mask_ratio"], cfg["mask_ratio_t0"])[0] / 1e9
        n.update(gflop_per_image=gflop, mfu=gflop * 1e9 * n["img_per_s_median"] / (peak * 1e12) if peak else None)
    if stages["train"]["exit"] == 124 and n["steady"]:  # stopped at its limit, as planned, after
        stages["train"]["status"] = "pass"                 # a steady img/s: what the stage is for
        n["stopped_at_limit"] = True
    stages["train"]["numbers"] = n
if "tests" in stages:
    lines = [l for l in (out / "tests.log").read_text(errors="replace").splitlines() if l.strip()] \
        if (out / "tests.log").exists() else []
    stages["tests"]["numbers"] = dict(summary=lines[-1].strip("= ") if lines else None)
    if mode == "gpu" and lines and " passed" not in lines[-1]:
        stages["tests"]["status"] = "fail (nothing ran)" if stages["tests"]["exit"] == 0 else stages["tests"]["status"]

passed = all(s["status"] == "pass" for s in stages.values()) and len(stages) == 4
fmt = lambda v, f="{:.1f}": "-" if v is None else f.format(v)
md = [f"# GPU check: {'PASSED' if passed else 'FAILED'} ({mode}, {seconds:.0f} s)", ""]
if machine:
    md.append(f"{machine.get('device')}; torch {machine.get('torch')}, CUDA {machine.get('cuda')}, Triton "
              f"{machine.get('triton')}, C compiler {machine.get('c_compiler')}; compile preflight "
              f"({machine.get('backend')}): {machine.get('compile')} in {machine.get('compile_s')} s")
    md.append("")
md += ["| stage | status | seconds | limit |", "|---|---|---|---|"]
md += [f"| {k} | {s['status']} | {s['seconds']:.0f} | {s['limit']} |" for k, s in stages.items()]
if bench:
    st = bench["settings"]
    md += ["", f"## Bench: {st['model']}/p{st['patch_size']}, batch {st['batch_size']}, amp {st['amp']}, "
           f"{st['steps']} timed steps after 1 + {st['warmup']}", "",
           "| run | first step s | img/s | MFU | peak GiB | MiB/img | graphs | recompiles | graph breaks | syncs | time/img vs dit |",
           "|---" * 11 + "|"]
    ref = next((r for r in bench["runs"] if r["method"] == "dit" and "error" not in r), None)
    for r in bench["runs"]:
        if "error" in r:
            md.append(f"| {r['label']} | failed: {r['error']} |")
            continue
        md.append(f"| {r['label']} | {r['first_step_s']:.1f} | {r['img_s']:.0f} | {fmt(r['mfu'] and 100 * r['mfu'], '{:.1f}%')} | "
                  f"{r['mem_gib']:.2f} | {r['mib_per_img']:.1f} | {fmt(r['graphs'], '{}')} | {fmt(r['recompiles'], '{}')} | "
                  f"{fmt(r['graph_breaks'], '{}')} | {fmt(r['syncs'], '{}')} | "
                  f"{fmt(ref and ref['img_s'] / r['img_s'], '{:.2f}x')} |")
if "train" in stages and not stages["train"]["numbers"]["steps"]:
    md += ["", "## Training: no step was logged (see train.log)"]
elif "train" in stages:
    n = stages["train"]["numbers"]
    c = n["config"]
    md += ["", f"## Training: {c['method']} {c['model']}/p{c['patch_size']}, batch {c['batch_size']}, amp {c['amp']}, "
           f"compile {c['compile']}, {c['device']}", "",
           f"- {n['steps']} steps in {stages['train']['seconds']:.0f} s; the first log interval (the step-0 probe and "
           f"compilation) ran at {fmt(n['img_per_s_first_interval'], '{:.0f}')} img/s",
           f"- after it: median {fmt(n['img_per_s_median'], '{:.0f}')} img/s over {n['intervals_after_first']} intervals"
           + (f" (from {n['img_per_s_range'][0]:.0f} to {n['img_per_s_range'][1]:.0f})" if n["img_per_s_range"] else "")
           + ("" if n["steady"] else "; too few intervals for a steady number")
           + (f"; MFU {100 * n['mfu']:.1f}% at {n['gflop_per_image']:.2f} GFLOP/img" if n.get("mfu") else ""),
           f"- loss {fmt(n['loss_first'], '{:.4f}')} -> {fmt(n['loss_last'], '{:.4f}')}"]
    if n["probes"]:
        md.append("- ridge probe (100 shots/class): " + ", ".join(
            f"step {p['step']}: {100 * p['probe']:.1f}% (EMA {100 * p['probe_ema']:.1f}%)" for p in n["probes"]))
if "tests" in stages:
    md += ["", f"## CUDA tests: {stages['tests']['numbers']['summary']}"]
if note:
    md += ["", f"Stood in by data_batch_1 (only part of CIFAR-10 was carried):{' ' + note}"]
# nothing over 16 MiB comes back from a lent machine: keep a log's last MiB
cut = []
for p in sorted(out.rglob("*")):
    if p.is_file() and p.stat().st_size > MAX_FILE:
        p.write_bytes(b"[cut by gpu_check.sh: only the last MiB is kept]\n" + p.read_bytes()[-2 ** 20:])
        cut.append(str(p.relative_to(out)))
if cut:
    md += ["", f"Cut to their last MiB (over 16 MiB): {', '.join(cut)}"]
save_atomic("\n".join(md) + "\n", out / "gpu_check.md")
write_json(dict(passed=passed, mode=mode, seconds=round(seconds, 1), stages=stages,
                stood_in=note.split(), cut=cut), out / "gpu_check.json")
print("\n".join(md))
sys.exit(0 if passed else 1)
EOF
code=$?
if [ "$code" = 0 ]; then echo "GPU CHECK PASSED: $out/gpu_check.md"
else echo "GPU CHECK FAILED (see $out/gpu_check.md and the stage logs beside it)" >&2; code=1; fi
exit $code
