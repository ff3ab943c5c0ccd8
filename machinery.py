"""The machinery around the training step, kept out of the method's files: the run folder
(lock, config, log, checkpoints), atomic writes, Ctrl-C, the loss meter and one-line errors.
Nothing here changes what is computed: a first read of train.py can take Run's calls on trust.
(devices.py: the device, precision, DDP, micro-batches, compile.)
"""
import io
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

try:
    import fcntl  # POSIX: a lock that the kernel drops when its process dies, however it dies
except ImportError:  # Windows: no run-folder lock
    fcntl = None


class TrainError(Exception):
    """A run that cannot start or go on (data too small, a non-finite loss): one line, exit 2."""


class FlagError(Exception):
    """An impossible flag value: one line, exit 2."""


# ----------------------------------------------------------------------------- files
def save_atomic(obj, path):
    """Write to a temp file, fsync, rename: a crash, a full disk or Ctrl-C never leaves a
    half-written file under `path`, nor a temp file beside it. obj is text, a function that
    writes into the open file, or anything torch.save takes."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            if isinstance(obj, str):
                f.write(obj.encode())
            elif callable(obj):
                obj(f)
            else:  # serialised in memory first: torch's zip writer hides a full disk's OSError
                buffer = io.BytesIO()
                torch.save(obj, buffer)
                f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # say which file could not be written
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(obj, path):
    """obj as indented JSON, atomically."""
    save_atomic(json.dumps(obj, indent=2) + "\n", path)


def writable(path, what="output"):
    """Check before the work that an output file can be written there (its folder is made):
    one clear OSError now rather than a lost result later."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, f"{what} is a folder; give a file name", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(path.parent, os.W_OK):
        raise PermissionError(13, "Permission denied", str(path.parent))
    return path


def os_error_line(e):
    """One line for an OSError at the project's edges: what, where, and what to do."""
    where = f" {e.filename}" if e.filename else ""
    hint = {28: "; free some space (a stopped run resumes with --resume)",
            13: "; choose a folder you can write", 30: "; choose a folder you can write"}
    return f"cannot use{where}: {e.strerror or e}{hint.get(e.errno, '')}"


def command_line(prog, main, errors):
    """Run a script's main and return its exit status: its user errors and OS errors are one
    line and 2, Ctrl-C one line and 130; never a traceback."""
    try:
        code = main() or 0
    except errors as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        code = 2
    except OSError as e:
        print(f"{prog}: error: {os_error_line(e)}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt as e:  # its message, where it has one
        print(f"{prog}: {str(e) or 'interrupted; no file was left half-written'}", file=sys.stderr)
        code = 130
    return code


def check_finite(args, error):
    """Every float flag finite: nan and inf pass argparse's float(), and make garbage later."""
    for key, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise error(f"--{key.replace('_', '-')} {value} is not a finite number")


def parse_log_line(line):
    """A log record, or None for a line that is not one (half-written by a crash, or damaged)."""
    try:
        rec = json.loads(line)
    except ValueError:  # JSONDecodeError, and undecodable bytes
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("step"), int) else None


def read_log(path):
    """The records of a log.jsonl (none for a missing file)."""
    path = Path(path)
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return [r for r in map(parse_log_line, lines) if r]


class LossMeter:
    """Sums of the losses since the last log point, kept on the device, and the first step whose
    loss was not finite: the host reads them at log points only, so it never waits mid-interval."""

    def __init__(self, device):
        self.zero = torch.zeros((), device=device)
        self.sums = torch.zeros(3, device=device)    # loss, loss_t0, loss_t
        self.counts = torch.zeros(3, device=device)  # a DDP rank may have no noise-free images
        self.present = None
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.restart()

    def restart(self):  # probes and checkpoints are not training time
        self.sums.zero_()
        self.counts.zero_()
        self.steps, self.start = 0, time.time()

    @torch.no_grad()
    def add(self, step, losses):
        """One step's (loss, stats) of each micro-batch: the step's loss is their mean."""
        loss = torch.stack([l.detach() for l, _ in losses]).mean()
        stats = {k: torch.stack([s[k] for _, s in losses]).mean() for k in losses[0][1]}
        if self.present is None:  # which groups this rank has is the same at every step
            self.groups = ("loss_t0" in stats, "loss_t" in stats)  # on the host, for the log
            self.present = torch.tensor([1.0, *self.groups],
                                        device=self.sums.device)
        self.sums += torch.stack([loss, stats.get("loss_t0", self.zero),
                                  stats.get("loss_t", self.zero)])
        self.counts += self.present
        bad = (self.bad_step < 0) & ~torch.isfinite(loss)
        self.bad_step = torch.where(bad, step + 1, self.bad_step)
        self.steps += 1

    def read(self, world):
        """(mean loss, loss_t0, loss_t over the interval and ranks, steps, seconds, bad step)."""
        if world > 1:
            for t in (self.sums, self.counts):
                dist.all_reduce(t)
            dist.all_reduce(self.bad_step, op=dist.ReduceOp.MAX)
        means = (self.sums / self.counts.clamp(min=1)).tolist()
        return means, self.steps, time.time() - self.start, self.bad_step.item()


# ----------------------------------------------------------------------------- the run folder
def claim(out):
    """Make the run folder and lock it: a second run on it stops with one line instead of
    sharing its files. The lock goes with the returned file: closed, or its process ended."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / ".lock", "a")
    if fcntl is not None:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise TrainError(f"{out} is in use by another run; wait for it to end or pass "
                             "another --out")
    for name in ("ckpt.pt", "config.json", "log.jsonl"):  # a killed run's temp files
        for tmp in out.glob(f"{name}.*.tmp"):
            tmp.unlink()
    return lock


class Run:
    """The run folder as the loop sees it: config.json, log.jsonl, ckpt.pt, a progress bar,
    the in-training probe and Ctrl-C. After every step, end_step() keeps the losses and, at log
    points, logs, probes and saves. The first Ctrl-C (or SIGTERM) lets the step finish, save and
    stop (under DDP at the next log point, which every rank reaches); a second aborts at once,
    never in the middle of a checkpoint write. probe(step) -> log fields; state(step) -> the
    checkpoint dict."""

    def __init__(self, out, lock, info, resumed, world, device, stop_step, probe=None,
                 probe_steps=0, state=None):
        self.out, self.lock, self.world, self.device = Path(out), lock, world, device
        self.main = main_process = lock is not None
        self.ckpt, self.step, self.info = self.out / "ckpt.pt", info["step"], info
        self.steps_per_epoch, self.stop_step = info["steps_per_epoch"], stop_step
        self.probe, self.probe_steps, self.state = probe, probe_steps, state
        self.saved_step = self.step if resumed else None  # the checkpoint on disk
        self.meter, self.stop, self.last_save = LossMeter(device), False, time.time()
        self.last_loss = float("nan")
        if main_process:  # the log: empty for a new run; on resume, cut back to the checkpoint
            write_json(info, self.out / "config.json")
            log = self.out / "log.jsonl"
            kept = [r for r in read_log(log) if r["step"] <= self.step] if resumed else []
            save_atomic("".join(json.dumps(r) + "\n" for r in kept), log)
        self.log_file = open(self.out / "log.jsonl" if main_process else os.devnull, "a")
        self.bar = tqdm(total=stop_step, initial=self.step, disable=not main_process,
                        desc=self.out.name, unit="step", dynamic_ncols=True)

    def __enter__(self):
        signals = (signal.SIGINT, signal.SIGTERM)
        self.previous = {s: signal.signal(s, self._on_signal) for s in signals}
        if self.probe and self.step == 0:  # the untrained network and raw pixels: numbers to beat
            self.log({"step": 0, "epoch": 0.0, **self.probe(0)})
        self.meter.restart()
        return self

    def _on_signal(self, signum, frame):
        self.stop = True
        signal.signal(signum, self.previous[signum])  # the next one raises KeyboardInterrupt

    def __exit__(self, kind, error, tb):
        self.bar.close()
        self.log_file.close()
        if self.lock:
            self.lock.close()
        for s, h in self.previous.items():
            signal.signal(s, h)
        kept = (f"{self.ckpt} (step {self.saved_step}) is kept" if self.saved_step is not None
                else "no checkpoint was written yet")
        if kind is KeyboardInterrupt:  # a second Ctrl-C: no time to save
            raise KeyboardInterrupt(f"aborted at step {self.step} by a second Ctrl-C; {kept}")
        if kind is not None and issubclass(kind, torch.OutOfMemoryError):
            raise TrainError(out_of_memory_line(self.info, self.device, self.saved_step)) from None

    def end_step(self, step, lr, losses):
        """After a step (`step`: the steps done): keep its losses; at a log point, log (and probe,
        and save when due). True when a Ctrl-C asked to stop and the checkpoint is saved."""
        self.meter.add(step - 1, losses)
        self.step = step
        self.bar.update(1)
        log_every = self.info["log_every"]
        probe_due = self.probe_steps > 0 and (step % self.probe_steps == 0
                                              or step == self.stop_step)
        if not self.at_log_point(step % log_every == 0 or step == self.stop_step or probe_due):
            return False
        rec = self.losses(step, lr, self.info["batch_size"])
        if self.probe and probe_due:
            rec.update(self.probe(step))
        self.log(rec)
        if step == self.stop_step or self.save_due(self.info["ckpt_minutes"]):
            self.save(self.state(step))
        self.meter.restart()  # probes and checkpoints are not training time
        return self.stop

    def at_log_point(self, due):
        """Every rank must reach the same log points: a Ctrl-C under DDP waits for a regular one."""
        if not (due or (self.stop and self.world == 1)):
            return False
        if self.world > 1:
            flag = torch.tensor([float(self.stop)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.stop = bool(flag.item())
        return True

    def losses(self, step, lr, batch_size):
        """The log record of the interval that ends at `step`; a non-finite loss stops the run."""
        (loss, loss_t0, loss_t), n, seconds, bad_step = self.meter.read(self.world)
        if bad_step >= 0:
            kept = (f"the last good checkpoint ({self.ckpt}, step {self.saved_step}) is kept"
                    if self.saved_step is not None else "no checkpoint was written")
            raise TrainError(f"the loss became non-finite at step {bad_step}; stopped: {kept}; "
                             "try a lower --lr or --amp off")
        rec = {"step": step, "epoch": round(step / self.steps_per_epoch, 4), "loss": loss}
        has_t0, has_t = self.meter.groups
        rec.update({k: v for k, v, p in (("loss_t0", loss_t0, has_t0), ("loss_t", loss_t, has_t))
                    if p})
        rec.update(lr=lr, img_per_s=n * batch_size / seconds)
        self.last_loss = loss
        self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rec['img_per_s']:.0f}")
        return rec

    def log(self, rec):
        self.log_file.write(json.dumps(rec) + "\n")
        self.log_file.flush()

    def save_due(self, minutes):
        return self.stop or time.time() - self.last_save > 60 * minutes

    def save(self, state):
        """Write the checkpoint; a Ctrl-C or SIGTERM meanwhile is held until the write ends."""
        if self.main:
            caught = []
            held = {s: signal.signal(s, lambda signum, frame: caught.append(signum))
                    for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                save_atomic(state, self.ckpt)
                self.saved_step = state["step"]
            finally:
                for s, handler in held.items():
                    signal.signal(s, handler)
            for s in caught:  # the write is whole: now they count, as if they came now
                signal.raise_signal(s)
        self.last_save = time.time()

    def interrupted(self, step):
        """After the first Ctrl-C: the checkpoint is saved; say how to go on."""
        self.bar.close()
        if self.world > 1:  # the other ranks wait for rank 0's checkpoint
            dist.barrier()
        if self.main:
            tqdm.write(f"interrupted at step {step}: checkpoint saved to {self.ckpt}; "
                       f"continue with --resume --out {self.out}")
        return 130


def out_of_memory_line(info, device, saved_step):
    """Out of memory in a step: which device, how much it holds, and the --grad-accum to try."""
    where = (f"{torch.cuda.get_device_name(device)} "
             f"({torch.cuda.get_device_properties(device).total_memory / 2 ** 30:.0f} GiB)"
             if device.type == "cuda" else "the CPU")
    accum = 2 * info["grad_accum"]
    micro = info["batch_size"] // (info["world_size"] * info["grad_accum"])
    go_on = (f"{info['out']}/ckpt.pt (step {saved_step}) is kept: go on with --resume --out "
             f"{info['out']} --grad-accum {accum}" if saved_step is not None else
             f"no checkpoint was written yet: start again with --grad-accum {accum}")
    return (f"out of memory on {where} with micro-batches of {micro} images; {go_on} "
            "(half the memory for activations, the same recipe)")


def checkpoint(model, ema, opt, scaler, step, steps_per_epoch, args, data):
    """Everything --resume needs, and a config that rebuilds the model with no flags."""
    return {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None, "step": step,
            "epoch": step / steps_per_epoch,
            "config": {"model": model.config, "train": vars(args), "data": data}}


def check_same_data(resumed, data, path):
    """--resume: the data must be what the run was trained on (older runs did not record it)."""
    saved = resumed["config"].get("data")
    if saved and saved != data:
        diff = ", ".join(f"{k} {saved.get(k)} then, {data.get(k)} now" for k in data
                         if saved.get(k) != data.get(k))
        raise TrainError(f"--resume: the data differ from the run's ({diff}); pass the run's "
                         f"--data-dir or start a new run ({path})")
