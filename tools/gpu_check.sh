#!/usr/bin/env bash
# GPU check for a lent machine (no network, at most 64 MiB carried along). In under 8 minutes:
#   1. the test suite, CUDA tests included (tests/test_cuda.py);
#   2. tools/bench.py --compare: small/2, batch 1024, torch.compile + bf16;
#   3. a short real run of the default recipe on CIFAR-10 with its in-training ridge probe;
# then a summary table in OUT_DIR/gpu_check.md. Any failure (a CUDA error included) stops it
# with a non-zero exit and a line saying which stage failed.
#
#   bash tools/gpu_check.sh DATA_DIR [OUT_DIR]
#       DATA_DIR/cifar-10-batches-py needs data_batch_1 and test_batch (about 59 MiB); missing
#       training batches are stood in for by data_batch_1 (the summary says so).
#   CPU_SMOKE=1 bash tools/gpu_check.sh DATA_DIR [OUT_DIR]
#       the same stages at toy sizes on a CPU, to check the script itself.
set -euo pipefail
data=${1:?usage: bash tools/gpu_check.sh DATA_DIR [OUT_DIR]}
out=${2:-${OUT:-gpu_check_out}}
cd "$(dirname "$0")/.."
mkdir -p "$out"
stage="setup"
trap 'echo "GPU CHECK FAILED in stage: $stage (see $out/*.log)" >&2' ERR

if [ -n "${CPU_SMOKE:-}" ]; then
  tests=(tests/test_bench.py -q)
  bench=(--model tiny --patch-size 8 --batch-size 16 --steps 1 --warmup 1 --device cpu)
  run=(--model tiny --patch-size 8 --batch-size 64 --epochs 2 --probe-every 1 --device cpu --max-steps 6)
  budget=(120 120 120)
else
  python -c "import torch, sys; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), torch.__version__)"
  # the CPU-compile test is left out: it costs a minute here and CUDA compile is tested instead
  tests=(tests -q -x -k "not compiled_model_matches_eager")
  bench=(--batch-size 1024)
  run=(--epochs 50 --probe-every 2)  # the default recipe (small/2, batch 1024), a 50-epoch schedule
  budget=(180 180 100)  # seconds per stage: 7.7 minutes at most
fi

# A subset of CIFAR-10 travels to the machine: stand in data_batch_1 for missing training batches.
src="$data/cifar-10-batches-py"
[ -f "$src/data_batch_1" ] && [ -f "$src/test_batch" ] || { echo "need $src/data_batch_1 and test_batch" >&2; exit 2; }
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
mkdir -p "$work/cifar-10-batches-py"
note=""
for f in data_batch_1 data_batch_2 data_batch_3 data_batch_4 data_batch_5 test_batch; do
  if [ -f "$src/$f" ]; then ln -s "$(cd "$src" && pwd)/$f" "$work/cifar-10-batches-py/$f"
  else ln -s "$(cd "$src" && pwd)/data_batch_1" "$work/cifar-10-batches-py/$f"; note="$note $f"; fi
done

stage="tests"
timeout "${budget[0]}" python -m pytest "${tests[@]}" 2>&1 | tee "$out/tests.log"
stage="bench"
timeout "${budget[1]}" python tools/bench.py --compare "${bench[@]}" 2>&1 | tee "$out/bench.log"
stage="train"
rm -rf "$out/run"
# SIGINT at the time limit: train.py finishes its step, saves and exits with 130 (kept as the exit status)
set +e
timeout --preserve-status -s INT "${budget[2]}" python train.py --dataset cifar10 --data-dir "$work" --out "$out/run" "${run[@]}" \
  > "$out/train.log" 2>&1
code=$?
set -e
[ "$code" = 0 ] || [ "$code" = 130 ] || { tail -5 "$out/train.log" >&2; echo "GPU CHECK FAILED in stage: train" >&2; exit 1; }

stage="summary"
python - "$out" "$note" <<'EOF'
import json, sys
out, note = sys.argv[1], sys.argv[2].strip()
log = [json.loads(l) for l in open(f"{out}/run/log.jsonl")]
train = [r for r in log if "img_per_s" in r]
probes = [r for r in log if "probe" in r]
speed = sorted(r["img_per_s"] for r in train[1:] or train)[len(train[1:] or train) // 2]
cfg = json.load(open(f"{out}/run/config.json"))
lines = ["# GPU check", "", "## Tests", "", open(f"{out}/tests.log").read().strip().splitlines()[-1], "",
         "## tools/bench.py --compare", ""]
lines += [l for l in open(f"{out}/bench.log").read().splitlines() if l.startswith(("|", "#"))]
lines += ["", f"## Training: {cfg['method']} {cfg['model']}/p{cfg['patch_size']}, batch {cfg['batch_size']}, "
          f"amp {cfg['amp']}, compile {cfg['compile']}", "",
          f"- steps: {train[-1]['step']} ({train[-1]['epoch']:.2f} epochs); median img/s {speed:.0f}; last loss {train[-1]['loss']:.4f}"]
if probes:
    pix = next((r["probe_pixels"] for r in probes if "probe_pixels" in r), None)
    lines.append("- ridge probe (100 shots/class, 2000 test images): " + ", ".join(
        f"step {r['step']}: {100 * r['probe']:.1f}% (EMA {100 * r['probe_ema']:.1f}%)" for r in probes)
        + (f"; raw pixels {100 * pix:.1f}%" if pix is not None else ""))
if note:
    lines.append(f"- stood in by data_batch_1 (only part of CIFAR-10 was carried): {note}")
open(f"{out}/gpu_check.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo "GPU CHECK PASSED: summary in $out/gpu_check.md"
