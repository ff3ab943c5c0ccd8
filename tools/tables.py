"""tools/compare.py's numbers in words: table.md for one seed, or for several the mean +- sample
s.d. of every number, each method's paired difference from umd seed by seed, and each seed's own
table; and the probe-against-FID points of compare.png, with their spread."""
import statistics

from tools.curves import scatter


def where(m):
    """A compare.machine() record in words."""
    return f"{m['gpu'] or m['cpu']} ({m['cores']} cores), torch {m['torch']}"


def epochs_text(epochs):
    """'1 epoch', '2.5 epochs'."""
    return f"{epochs:g} epoch" + "s" * (epochs != 1)


def trained_where(pretrain, machine):
    """Where and how a pre-training ran, in words (machine: where its record names none)."""
    text = where(pretrain.get("machine", machine))
    return f"{text}, {pretrain['precision']}" if "precision" in pretrain else text


def numbers(r):
    """One method's numbers in one seed, by name: the probes (%, clean and at t=50), FID, img/s."""
    n = {}
    for stage, suffix in (("probe", ""), ("probe-t50", "_t50")):
        for key, field in (("linear", "top1"), ("fewshot", "mean"), ("knn", "top1")):
            value = r.get(stage, {}).get(key, {}).get(field)
            if value is not None:
                n[key + suffix] = 100 * value
    if "fid" in r:
        n["fid"] = r["fid"]["fid"]
    if "pretrain" in r:
        n["img_per_s"] = r["pretrain"]["img_per_s"]
    return n


def mean_sd(values):
    """Mean, sample s.d. (None under two values) and count of the values that are there."""
    v = [x for x in values if x is not None]
    return (dict(mean=statistics.fmean(v), sd=statistics.stdev(v) if len(v) > 1 else None,
                 n=len(v)) if v else None)


def aggregate(per_seed):
    """Per method, each number's mean +- s.d. over the seeds; but for umd, also its paired
    differences from umd in the same seed (vs_umd; probes at t=50 against umd's clean ones)."""
    nums = [{m: numbers(r) for m, r in s.items()} for s in per_seed]
    for s in nums:  # time per image against dit's, in the same seed
        for n in s.values():
            if "img_per_s" in n and "img_per_s" in s.get("dit", {}):
                n["time_vs_dit"] = s["dit"]["img_per_s"] / n["img_per_s"]
    out = {}
    for m, first in per_seed[0].items():
        names = list(dict.fromkeys(k for s in nums for k in s[m]))
        out[m] = r = dict(gflop_per_image=first["gflop_per_image"],
                          encoder_tokens_per_image=first["encoder_tokens_per_image"],
                          **{k: mean_sd([s[m].get(k) for s in nums]) for k in names})
        if m != "umd" and "umd" in nums[0]:
            r["vs_umd"] = {k: paired(nums, m, k) for k in names
                           if k.removesuffix("_t50") in ("linear", "fewshot", "knn", "fid")}
    return out


def paired(nums, m, k):
    """Mean +- s.d. over the seeds of m's number k minus umd's in the same seed (a probe at t=50
    against umd's clean one)."""
    base = k.removesuffix("_t50")
    return mean_sd([s[m][k] - s["umd"][base] for s in nums if k in s[m] and base in s["umd"]])


def table(results, args):
    ms = results["methods"]
    dit = ms.get("dit", {})
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}"

    def probe_cell(r, key, field):
        clean = r.get("probe", {}).get(key, {}).get(field)
        noisy = r.get("probe-t50", {}).get(key, {}).get(field)
        return pct(clean) + ("" if noisy is None else f" (t=50: {pct(noisy)})")

    rows = [head(args), "|---" * 9 + "|"]
    for m, r in ms.items():
        speed = r.get("pretrain", {}).get("img_per_s")
        fid = r.get("fid", {}).get("fid")
        fid_cell = ("-" if args.fid == 0 else f"{fid:.1f}" if fid is not None
                    else "waits" if "samples" in r else "")
        vs_flops = f"{r['gflop_per_image'] / dit['gflop_per_image']:.2f}x" if dit else "-"
        dit_speed = dit.get("pretrain", {}).get("img_per_s")
        vs_time = f"{dit_speed / speed:.2f}x" if dit_speed and speed else "-"
        rows.append(f"| {m} | {probe_cell(r, 'linear', 'top1')} | "
                    f"{probe_cell(r, 'fewshot', 'mean')} | {probe_cell(r, 'knn', 'top1')} | "
                    f"{fid_cell} | {'-' if speed is None else f'{speed:.0f}'} | "
                    f"{r['gflop_per_image']:.2f} | {vs_flops} | {vs_time} |")
    rows += ["", footnote(results, [ms], f"seed {results['settings']['seed']}")]
    return "\n".join(rows) + "\n"


def head(args):
    fid_head = (f"FID-{args.fid} (cfg {args.cfg_scale:g}, {args.fid_steps} DDIM steps)"
                if args.fid else "FID (--fid 0)")
    return (f"| method | linear probe % | {args.shots}-shot ridge % | 20-NN % | {fid_head} | "
            "pre-training img/s | GFLOP/img | FLOPs vs dit | time/img vs dit |")


def footnote(results, per_seed, seeds):
    s = results["settings"]
    trained_on = sorted({trained_where(r["pretrain"], results["machine"])
                         for ms in per_seed for r in ms.values() if "pretrain" in r})
    return (f"{s['model']}/p{s['patch_size']}, batch {s['batch_size']}, "
            f"lr {s['lr']:g} per 256, {epochs_text(s['epochs'])} of pre-training, "
            f"{s['finetune_epochs']:g} of fine-tuning (batch {s['finetune_batch_size']}), "
            f"{seeds}; probes of the EMA weights trained on {s['probe_images']} images, "
            f"scored on CIFAR-10 test; pre-trained on {'; '.join(trained_on) or '-'}.")


def seeds_table(results, per_seed, args, dirs):
    """table.md for several seeds (their folders: dirs): mean +- s.d., the paired differences from
    umd, each seed's table."""
    seeds, ms = results["seeds"], results["methods"]
    n = len(seeds)

    def cell(s, digits=2, sign=""):
        if s is None:
            return "-"
        sd = "" if s["sd"] is None else f" ± {s['sd']:.{digits}f}"
        return f"{s['mean']:{sign}.{digits}f}{sd}" + (f" (n={s['n']})" if s["n"] < n else "")

    def probes(r, key, sign=""):
        noisy = f" (t=50: {cell(r[key + '_t50'], 2, sign)})" if r.get(key + "_t50") else ""
        return cell(r.get(key), 2, sign) + noisy

    dit = ms.get("dit")
    rows = [f"Mean ± s.d. over {n} seeds ({', '.join(map(str, seeds))}; the sample s.d.); "
            "(n=K): a number that K seeds have so far.", "", head(args), "|---" * 9 + "|"]
    for m, r in ms.items():
        vs_flops = f"{r['gflop_per_image'] / dit['gflop_per_image']:.2f}x" if dit else "-"
        rows.append(f"| {m} | {probes(r, 'linear')} | {probes(r, 'fewshot')} | "
                    f"{probes(r, 'knn')} | {cell(r.get('fid'), 1)} | "
                    f"{cell(r.get('img_per_s'), 0)} | {r['gflop_per_image']:.2f} | {vs_flops} | "
                    f"{cell(r.get('time_vs_dit'))} |")
    rows += ["", footnote(results, per_seed, f"seeds {', '.join(map(str, seeds))}"), ""]
    if "umd" in ms:
        rows += [f"Paired difference from umd, seed by seed (method - umd in the same seed; "
                 f"mean ± s.d. over {n} seeds): probes in percentage points (at t=50 against "
                 "umd's clean probe), FID in FID points (below 0: better than umd).", "",
                 f"| method | linear probe | {args.shots}-shot ridge | 20-NN | FID |",
                 "|---" * 5 + "|"]
        rows += [f"| {m} | {probes(r['vs_umd'], 'linear', '+')} | "
                 f"{probes(r['vs_umd'], 'fewshot', '+')} | {probes(r['vs_umd'], 'knn', '+')} | "
                 f"{cell(r['vs_umd'].get('fid'), 1, '+')} |" for m, r in ms.items() if m != "umd"]
    for k, r, d in zip(seeds, per_seed, dirs):
        one = dict(results, settings={**results["settings"], "seed": k}, methods=r)
        rows += ["", f"## Seed {k} ({d})", "", table(one, args).rstrip("\n")]
    return "\n".join(rows) + "\n"


def tradeoff(per_seed):
    """Representation against generation, one dot per method: the few-shot ridge probe (right is
    better) and FID (up is better), with +- s.d. bars over seeds. None until two methods have
    both numbers."""
    points = []
    for m in per_seed[0]:
        both = [(100 * s[m]["probe"]["fewshot"]["mean"], s[m]["fid"]["fid"])
                for s in per_seed if "probe" in s[m] and "fid" in s[m]]
        if both:
            x, y = mean_sd([b[0] for b in both]), mean_sd([b[1] for b in both])
            points.append((m, x["mean"], x["sd"], y["mean"], y["sd"]))
    if len(points) < 2:
        return None
    spread = f" (± s.d., {len(per_seed)} seeds)" if len(per_seed) > 1 else ""
    return scatter(points, "few-shot ridge probe % (right: better)", "FID (up: better)",
                   f"probe against FID{spread}")
