"""A PyTorch training under each CUDA allocator: steps/s and device memory held.

The workload of issue 10, built as a user would: a transformer encoder (4 layers,
d_model 512, 8 heads, feed-forward 2048, batch 16) over token embeddings with a
vocabulary head, AdamW, cross-entropy; the sequence length changes every step (64..512,
drawn from a fixed-seed RNG, so every run sees the same sequence and the same data).

Each run is a process of its own (the allocator is process-wide and fixed before CUDA is
first used): `torch_model_bench.py --worker MODE CONFIG_JSON`. The modes:
  native           PyTorch's caching allocator
  cudaMallocAsync  PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync (the seed)
  streamalloc      streamalloc_torch.install(), STREAMALLOC_CONF unset (the C ABI's
                   default: the lean release preset)
  streamalloc_fast streamalloc_torch.install(), STREAMALLOC_CONF=release:fast
  (more with --extra-mode NAME=STREAMALLOC_CONF)
The modes interleave: round r runs every mode once, in an order rotated by r, so drift
of the card (clocks, temperature) falls on every mode alike.

Per run: steps/s over the steps after the warm-up (torch.cuda.synchronize on both ends);
memory held = device memory in use at the end (model, optimizer state and the last
step's tensors alive) minus the same just before the first allocation, from
torch.cuda.mem_get_info (the same measure for every mode; it leaves the CUDA context
out); the process's own line of nvidia-smi --query-compute-apps where the host shows it
(it includes the context); the held measure sampled after every step (its peak); the
allocator's own figures (torch.cuda.memory_reserved / max_memory_reserved /
max_memory_allocated, which all three backends answer, and streamalloc_torch.stats()
for streamalloc); memory held after torch.cuda.empty_cache(); the final loss.

Output (--out DIR): torch_model_bench.csv (one row per run, the card's name in every
row), torch_model_bench_summary.csv (gpu,mode,metric,value: medians and ratios),
torch_model_bench.log (every worker's output and the tables), torch_model_bench.json.
The summary is printed last. Exit status 1 when a run failed or saw another sequence.

    python3 torch_model_bench.py --out DIR                # defaults: the issue's workload
    python3 torch_model_bench.py --dry-run --out DIR      # CPU, tiny sizes: the plumbing
    python3 torch_model_bench.py --self-test              # no torch: arguments, CSV, summary

Where streamalloc_torch comes from: the installed package (benches/gpu/torch_model_bench.sh
installs the wheel offline), or PYTHONPATH / STREAMALLOC_LIB as the module's docs say.
"""

import argparse
import csv
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import time

MiB = 1 << 20

# mode -> (PYTORCH_CUDA_ALLOC_CONF, STREAMALLOC_CONF, installs streamalloc)
BASE_MODES = {
    "native": (None, None, False),
    "cudaMallocAsync": ("backend:cudaMallocAsync", None, False),
    "streamalloc": (None, None, True),
    "streamalloc_fast": (None, "release:fast", True),
}
SEED_MODE = "cudaMallocAsync"
NATIVE_MODE = "native"

# One CSV row per run; memory in MiB.
RUN_FIELDS = [
    "gpu", "mode", "rep", "position", "steps", "warmup", "batch", "seq_min", "seq_max",
    "steps_per_s", "held_mib", "proc_mib", "peak_held_mib", "held_after_empty_mib",
    "reserved_mib", "peak_reserved_mib", "allocated_mib", "peak_allocated_mib",
    "pool_idle_mib", "sa_reserved_mib", "sa_cached_mib", "final_loss", "wall_s", "ok",
]
# Summarised per mode (medians), in this order.
SUMMARY_METRICS = [
    "steps_per_s", "held_mib", "proc_mib", "peak_held_mib", "held_after_empty_mib",
    "reserved_mib", "peak_reserved_mib", "peak_allocated_mib", "pool_idle_mib",
    "sa_cached_mib", "final_loss",
]


# ----- the workload (shared by the worker and the dry run's checks) -----

def seq_lengths(seed, steps, lo, hi):
    """The per-step sequence lengths: uniform in [lo, hi], from random.Random(seed)."""
    if not 1 <= lo <= hi:
        raise ValueError(f"sequence lengths: need 1 <= seq_min <= seq_max, got {lo}..{hi}")
    rng = random.Random(seed)
    return [rng.randint(lo, hi) for _ in range(steps)]


def seq_digest(lengths):
    """A short digest of a length sequence: runs that saw the same sequence agree."""
    return hashlib.sha256(",".join(map(str, lengths)).encode()).hexdigest()[:16]


def build_model(torch, cfg):
    nn = torch.nn

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            d = cfg["d_model"]
            self.tok = nn.Embedding(cfg["vocab"], d)
            self.pos = nn.Embedding(cfg["seq_max"], d)
            layer = nn.TransformerEncoderLayer(d, cfg["nhead"], cfg["ff"], dropout=0.1,
                                               batch_first=True)
            self.enc = nn.TransformerEncoder(layer, cfg["layers"], enable_nested_tensor=False)
            self.norm = nn.LayerNorm(d)
            self.head = nn.Linear(d, cfg["vocab"])

        def forward(self, tokens):
            pos = torch.arange(tokens.shape[1], device=tokens.device)
            return self.head(self.norm(self.enc(self.tok(tokens) + self.pos(pos))))

    return Encoder()


# ----- memory measures (inside a worker) -----

def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Held:
    """Memory in use now minus at creation: the device's (mem_get_info) on CUDA, the
    process's resident set on the CPU dry run (a stand-in that exercises the same code)."""

    def __init__(self, torch, device):
        self.torch, self.cuda = torch, device == "cuda"
        self.base = self._used()
        self.peak = 0

    def _used(self):
        if self.cuda:
            free, total = self.torch.cuda.mem_get_info()
            return total - free
        return _rss_bytes()

    def now(self):
        v = self._used() - self.base
        self.peak = max(self.peak, v)
        return v


def proc_used_mib():
    """This process's used_memory line in nvidia-smi (None where the host hides it, e.g.
    in a container's PID namespace)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                              "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(os.getpid()):
            try:
                return float(parts[1])
            except ValueError:
                return None
    return None


def mib(v):
    return None if v is None else v / MiB


# ----- worker -----

def worker(mode, cfg):
    t_start = time.perf_counter()
    res = {"mode": mode, "ok": False}
    installs = cfg["modes"][mode][2]
    sa = None
    if installs:
        import streamalloc_torch as sa
        if cfg["device"] == "cuda":
            how = sa.install()
            if how != "shim":
                raise RuntimeError(f"streamalloc_torch.install() gave {how!r}, not 'shim'")
        else:  # the dry run: the library on the simulated device, not PyTorch's allocator
            sa._load(sa._find_lib(None))
        res["streamalloc_config"] = sa.config()
        res["streamalloc_lib"] = sa.lib_path()
        res["streamalloc_backend"] = sa.backend()
        want = "cuda" if cfg["device"] == "cuda" else "sim"
        if res["streamalloc_backend"] != want:
            raise RuntimeError(f"streamalloc backend {res['streamalloc_backend']!r}, expected {want!r}")
    import torch
    dev = cfg["device"]
    if dev == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available (use --device cpu for a dry run)")
    res["torch"] = torch.__version__
    if dev == "cuda":
        # PyTorch's own name for its allocator: checks that the mode took effect.
        res["allocator_backend"] = torch.cuda.get_allocator_backend()
        expect = {"native": "native", "cudaMallocAsync": "cudaMallocAsync"}.get(mode)
        if expect and res["allocator_backend"] != expect:
            raise RuntimeError(f"mode {mode}: PyTorch reports allocator backend "
                               f"{res['allocator_backend']!r}")
    held = Held(torch, dev)  # before the first allocation (creates the context on CUDA)

    torch.manual_seed(cfg["seed"])
    lengths = seq_lengths(cfg["seed"], cfg["steps"], cfg["seq_min"], cfg["seq_max"])
    res["seq_digest"] = seq_digest(lengths)
    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    data = [(torch.randint(cfg["vocab"], (cfg["batch"], n), generator=g),
             torch.randint(cfg["vocab"], (cfg["batch"], n), generator=g)) for n in lengths]

    model = build_model(torch, cfg).to(dev)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
    loss_fn = torch.nn.CrossEntropyLoss()
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    losses = []
    t0 = None
    for step, (x, y) in enumerate(data):
        if step == cfg["warmup"]:
            sync()
            t0 = time.perf_counter()
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = loss_fn(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        if cfg["sample_every"] and (step + 1) % cfg["sample_every"] == 0:
            held.now()
    sync()
    t1 = time.perf_counter()
    timed = cfg["steps"] - cfg["warmup"]
    res["steps_per_s"] = timed / (t1 - t0) if t0 is not None and t1 > t0 else None
    losses = [float(v) for v in torch.stack(losses).cpu()]
    res["final_loss"] = losses[-1]
    res["losses_ok"] = all(v == v and abs(v) != float("inf") for v in losses)

    # At the end, everything alive (model, optimizer state, the last step's tensors).
    res["held_mib"] = mib(held.now())
    res["peak_held_mib"] = mib(held.peak)
    if dev == "cuda":
        res["proc_mib"] = proc_used_mib()
        res["reserved_mib"] = mib(torch.cuda.memory_reserved())
        res["peak_reserved_mib"] = mib(torch.cuda.max_memory_reserved())
        res["allocated_mib"] = mib(torch.cuda.memory_allocated())
        res["peak_allocated_mib"] = mib(torch.cuda.max_memory_allocated())
        res["pool_idle_mib"] = res["reserved_mib"] - res["allocated_mib"]
    if sa is not None:  # on the dry run, the simulated device's (unused) statistics
        st = sa.stats(0)
        res["streamalloc_stats"] = st
        res["sa_reserved_mib"] = mib(st["reserved_current"])
        res["sa_cached_mib"] = mib(st["cached_current"])
    del out, loss, x, y
    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
    res["held_after_empty_mib"] = mib(held.now())
    res["wall_s"] = time.perf_counter() - t_start
    res["ok"] = res["losses_ok"] and res["steps_per_s"] is not None
    return res


def worker_main(mode, cfg_json):
    cfg = json.loads(cfg_json)
    try:
        res = worker(mode, cfg)
    except Exception as e:  # noqa: BLE001 - reported to the parent as a failed run
        import traceback
        res = {"mode": mode, "ok": False, "error": repr(e), "trace": traceback.format_exc()[-3000:]}
    print("RESULT " + json.dumps(res), flush=True)
    return 0 if res.get("ok") else 1


# ----- orchestration -----

def card_name(device):
    if device != "cuda":
        return "cpu"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    names = [n.strip() for n in out.splitlines() if n.strip()]
    return names[0] if names else "unknown"


def mode_env(mode, cfg):
    """The worker's environment: exactly the mode's allocator settings (the caller's
    PYTORCH_CUDA_ALLOC_CONF / STREAMALLOC_CONF do not leak into other modes); streamalloc
    on the real device, or on the simulated one for the CPU dry run."""
    torch_conf, sa_conf, _ = cfg["modes"][mode]
    backend = "sim" if cfg["device"] == "cpu" else None
    env = dict(os.environ)
    for key, value in (("PYTORCH_CUDA_ALLOC_CONF", torch_conf), ("STREAMALLOC_CONF", sa_conf),
                       ("STREAMALLOC_BACKEND", backend)):
        env.pop(key, None)
        if value is not None:
            env[key] = value
    return env


def run_one(mode, cfg, log, timeout):
    t0 = time.time()
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, json.dumps(cfg)]
    try:
        p = subprocess.run(cmd, env=mode_env(mode, cfg), capture_output=True,
                           text=True, timeout=timeout)
        out, err, rc = p.stdout, p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        def text(b):
            return b if isinstance(b, str) else (b or b"").decode(errors="replace")
        out, err, rc = text(e.stdout), text(e.stderr) + "\nTIMEOUT", -1
    log.write(f"=== {mode} rc={rc} {time.time() - t0:.1f}s\n{out}--- stderr\n{err[-4000:]}\n")
    log.flush()
    res = {"mode": mode, "ok": False, "error": f"no result (rc={rc})", "stderr": err[-1500:]}
    for line in out.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
    if rc != 0 and res.get("ok"):
        res = {**res, "ok": False, "error": f"worker exit code {rc}"}
    res["process_s"] = time.time() - t0
    return res


def fmt(v, digits=1):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def csv_row(gpu, r, cfg):
    fixed = {"gpu": gpu, "steps": cfg["steps"], "warmup": cfg["warmup"], "batch": cfg["batch"],
             "seq_min": cfg["seq_min"], "seq_max": cfg["seq_max"]}
    row = {}
    for k in RUN_FIELDS:
        v = r.get(k)
        if k in fixed:
            row[k] = fixed[k]
        elif k == "ok":
            row[k] = int(bool(v))
        elif k == "final_loss":
            row[k] = fmt(v, 5)
        elif k == "steps_per_s":
            row[k] = fmt(v, 3)
        else:
            row[k] = fmt(v, 1) if isinstance(v, float) else ("" if v is None else v)
    return row


def median_of(runs, key):
    vals = [r[key] for r in runs if r.get("ok") and isinstance(r.get(key), (int, float))]
    return (statistics.median(vals), min(vals), max(vals), len(vals)) if vals else None


def summarize(results, modes, gpu):
    """Medians per mode and the ratios of issue 10. Returns (table lines, summary rows)."""
    med = {m: {k: median_of([r for r in results if r["mode"] == m], k) for k in SUMMARY_METRICS}
           for m in modes}
    rows = []  # (gpu, mode, metric, value)
    for m in modes:
        n_ok = sum(1 for r in results if r["mode"] == m and r.get("ok"))
        rows.append((gpu, m, "runs_ok", n_ok))
        for k in SUMMARY_METRICS:
            if med[m][k] is not None:
                rows.append((gpu, m, k + "_median", med[m][k][0]))

    def ratio(a, b, key):
        x, y = med.get(a, {}).get(key), med.get(b, {}).get(key)
        if x is None or y is None or not y[0]:
            return None
        return x[0] / y[0]

    ratio_rows = []  # (mode, label, value, goal text)
    for m in modes:
        if m in (SEED_MODE, NATIVE_MODE):
            continue
        for key, base, label, goal in (
                ("held_mib", SEED_MODE, "held / cudaMallocAsync held", ("<=", 1.05)),
                ("proc_mib", SEED_MODE, "nvidia-smi / cudaMallocAsync's", None),
                ("peak_held_mib", SEED_MODE, "peak held / cudaMallocAsync's", None),
                ("steps_per_s", NATIVE_MODE, "steps/s / native steps/s", (">=", 1.0)),
                ("steps_per_s", SEED_MODE, "steps/s / cudaMallocAsync's", None)):
            v = ratio(m, base, key)
            if v is None:
                continue
            metric = f"ratio_{key}_over_{base}"
            rows.append((gpu, m, metric, v))
            verdict = ""
            if goal:
                met = v <= goal[1] if goal[0] == "<=" else v >= goal[1]
                verdict = f"goal {goal[0]} {goal[1]:.2f}: {'met' if met else 'MISSED'}"
            ratio_rows.append((m, label, v, verdict))
    if SEED_MODE in modes and NATIVE_MODE in modes:
        for key, label in (("held_mib", "held / native held"),
                           ("steps_per_s", "steps/s / native steps/s")):
            v = ratio(SEED_MODE, NATIVE_MODE, key)
            if v is not None:
                rows.append((gpu, SEED_MODE, f"ratio_{key}_over_{NATIVE_MODE}", v))
                ratio_rows.append((SEED_MODE, label, v, "(reference)"))

    lines = [f"\nPyTorch transformer training, {gpu}: medians over runs (min..max); memory in MiB"]
    cols = [("steps/s", "steps_per_s", 2), ("held", "held_mib", 0), ("nvidia-smi", "proc_mib", 0),
            ("peak held", "peak_held_mib", 0), ("after empty", "held_after_empty_mib", 0),
            ("reserved", "reserved_mib", 0), ("peak alloc", "peak_allocated_mib", 0),
            ("idle in pool", "pool_idle_mib", 0), ("final loss", "final_loss", 4)]
    head = f"{'mode':18}{'runs':>5}" + "".join(f"{c[0]:>14}" for c in cols)
    lines.append(head)
    for m in modes:
        n_ok = sum(1 for r in results if r["mode"] == m and r.get("ok"))
        n = sum(1 for r in results if r["mode"] == m)
        cells = []
        for _, key, d in cols:
            v = med[m][key]
            cells.append(f"{v[0]:>14.{d}f}" if v is not None else f"{'-':>14}")
        lines.append(f"{m:18}{f'{n_ok}/{n}':>5}" + "".join(cells))
    lines.append("")
    for m in modes:
        for key, d in (("steps_per_s", 2), ("held_mib", 0)):
            v = med[m][key]
            if v is not None:
                lines.append(f"  {m:18} {key:12} {v[1]:.{d}f} .. {v[2]:.{d}f} over {v[3]} runs")
    spread = [f"{m} {100 * (v[2] - v[1]) / v[0]:.1f}%" for m in modes
              for v in [med[m]["steps_per_s"]] if v is not None and v[0]]
    if spread:
        lines.append("  steps/s spread over runs, (max - min) / median: " + ", ".join(spread))
    losses = [r["final_loss"] for r in results if r.get("ok")]
    if losses:
        lines.append(f"  final loss over all runs: {min(losses):.6f} .. {max(losses):.6f} "
                     "(same data and seed: the allocator must not change the training)")
    if ratio_rows:
        lines.append("\nratios of medians")
        for m, label, v, verdict in ratio_rows:
            lines.append(f"  {m:18} {label:34} {v:6.3f}  {verdict}")
    return lines, rows


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="output folder ($OUT)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU and tiny sizes (unless given): checks the plumbing without a GPU")
    p.add_argument("--modes", default=",".join(BASE_MODES),
                   help="comma-separated, from: " + ", ".join(BASE_MODES) + " and --extra-mode names")
    p.add_argument("--extra-mode", action="append", default=[], metavar="NAME=STREAMALLOC_CONF",
                   help="another streamalloc mode with that configuration (repeatable)")
    p.add_argument("--reps", type=int, default=5, help="rounds (every mode once per round)")
    p.add_argument("--min-reps", type=int, default=3,
                   help="rounds always run; later ones only while --budget-s allows")
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="no new round after --min-reps when it would end past this (seconds)")
    p.add_argument("--deadline-s", type=float, default=360.0,
                   help="no run starts after this (seconds); a run is stopped 30s after it")
    p.add_argument("--timeout", type=float, default=120.0, help="per run (seconds)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (120)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (10)")
    p.add_argument("--batch", type=int, default=None, help="16")
    p.add_argument("--seq-min", type=int, default=None, help="64")
    p.add_argument("--seq-max", type=int, default=None, help="512")
    p.add_argument("--d-model", type=int, default=None, help="512")
    p.add_argument("--nhead", type=int, default=None, help="8")
    p.add_argument("--layers", type=int, default=None, help="4")
    p.add_argument("--ff", type=int, default=None, help="feed-forward width (2048)")
    p.add_argument("--vocab", type=int, default=None, help="2048")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--sample-every", type=int, default=1,
                   help="sample held memory every N steps for its peak (0: never)")
    a = p.parse_args(argv)
    full = dict(steps=120, warmup=10, batch=16, seq_min=64, seq_max=512, d_model=512, nhead=8,
                layers=4, ff=2048, vocab=2048)
    tiny = dict(steps=14, warmup=3, batch=2, seq_min=4, seq_max=24, d_model=32, nhead=4,
                layers=1, ff=64, vocab=64)
    if a.dry_run:
        a.device = "cpu"
    for k, v in (tiny if a.dry_run else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    modes = dict(BASE_MODES)
    for spec in a.extra_mode:
        name, sep, conf = spec.partition("=")
        if not sep or not name or "," in name or name in modes:
            p.error(f"--extra-mode {spec!r}: expected a new NAME=STREAMALLOC_CONF")
        modes[name] = (None, conf, True)
    chosen = [m.strip() for m in a.modes.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in modes]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        p.error(f"--modes {a.modes!r}: unknown or repeated {unknown}; known: {sorted(modes)}")
    for name in a.extra_mode:
        m = name.partition("=")[0]
        if m not in chosen:
            chosen.append(m)
    if a.steps <= a.warmup or a.warmup < 0:
        p.error(f"--steps {a.steps} must exceed --warmup {a.warmup} (>= 0)")
    if a.reps < 1 or a.min_reps < 1:
        p.error("--reps and --min-reps must be >= 1")
    if a.d_model % a.nhead:
        p.error(f"--d-model {a.d_model} is not a multiple of --nhead {a.nhead}")
    try:
        seq_lengths(a.seed, 1, a.seq_min, a.seq_max)
    except ValueError as e:
        p.error(str(e))
    a.mode_list = chosen
    a.mode_table = {m: modes[m] for m in chosen}
    return a


def main(argv):
    a = parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    cfg = {k: getattr(a, k) for k in ("device", "steps", "warmup", "batch", "seq_min", "seq_max",
                                      "d_model", "nhead", "layers", "ff", "vocab", "lr", "seed",
                                      "sample_every")}
    cfg["modes"] = a.mode_table
    lengths = seq_lengths(a.seed, a.steps, a.seq_min, a.seq_max)
    digest = seq_digest(lengths)
    gpu = card_name(a.device)
    paths = {k: os.path.join(a.out, f"torch_model_bench{k}") for k in
             (".csv", "_summary.csv", ".log", ".json")}
    header = [f"card: {gpu}",
              f"workload: {a.layers}-layer transformer encoder, d_model {a.d_model}, nhead {a.nhead}, "
              f"ff {a.ff}, vocab {a.vocab}, batch {a.batch}, AdamW lr {a.lr}; {a.steps} steps "
              f"({a.warmup} untimed), sequence length {a.seq_min}..{a.seq_max} per step, seed {a.seed}",
              f"sequence: {lengths[:12]}{' ...' if len(lengths) > 12 else ''} "
              f"(mean {statistics.mean(lengths):.1f}, digest {digest})",
              f"modes: {', '.join(f'{m} [{conf_text(a.mode_table[m])}]' for m in a.mode_list)}",
              f"rounds: {a.reps} ({a.min_reps} at least; more only within {a.budget_s:.0f}s; "
              f"no run starts after {a.deadline_s:.0f}s), interleaved"]
    print("\n".join(header), flush=True)
    results = []
    t_begin = time.time()
    failed = False
    with open(paths[".log"], "w") as log, open(paths[".csv"], "w", newline="") as fcsv:
        log.write("\n".join(header) + "\n")
        w = csv.DictWriter(fcsv, fieldnames=RUN_FIELDS)
        w.writeheader()
        round_times = []
        for rep in range(a.reps):
            if rep >= a.min_reps and round_times:
                expect = max(round_times)
                if time.time() - t_begin + expect > a.budget_s:
                    msg = (f"stopping after {rep} rounds: another (~{expect:.0f}s) would pass "
                           f"the {a.budget_s:.0f}s budget")
                    print(msg)
                    log.write(msg + "\n")
                    break
            t_round = time.time()
            order = a.mode_list[rep % len(a.mode_list):] + a.mode_list[:rep % len(a.mode_list)]
            for pos, mode in enumerate(order):
                elapsed = time.time() - t_begin
                if elapsed > a.deadline_s:
                    break
                r = run_one(mode, cfg, log, max(10.0, min(a.timeout, a.deadline_s + 30 - elapsed)))
                r["rep"], r["position"] = rep, pos
                if r.get("ok") and r.get("seq_digest") != digest:
                    r["ok"] = False
                    r["error"] = f"sequence digest {r.get('seq_digest')} != {digest}"
                failed |= not r.get("ok")
                results.append(r)
                w.writerow(csv_row(gpu, r, cfg))
                fcsv.flush()
                line = (f"round {rep} {mode:18} "
                        + (f"{r['steps_per_s']:8.2f} steps/s  held {r['held_mib']:8.1f} MiB  "
                           f"loss {r['final_loss']:.4f}  ({r['process_s']:.1f}s)"
                           if r.get("ok") else f"FAILED: {r.get('error', '?')[:150]}"))
                print(line, flush=True)
            round_times.append(time.time() - t_round)
            if time.time() - t_begin > a.deadline_s:
                msg = f"stopping in round {rep}: past the {a.deadline_s:.0f}s deadline"
                print(msg)
                log.write(msg + "\n")
                failed |= rep + 1 < a.min_reps
                break
        lines, rows = summarize(results, a.mode_list, gpu)
        configs = sorted({(r["mode"], r.get("streamalloc_config")) for r in results
                          if r.get("streamalloc_config")})
        lines += [f"  {m:18} STREAMALLOC_CONF in effect: {c}" for m, c in configs]
        lines.append(f"\n{len(results) - sum(1 for r in results if not r.get('ok'))} of "
                     f"{len(results)} runs ok, {time.time() - t_begin:.0f}s")
        log.write("\n".join(lines) + "\n")
    with open(paths["_summary.csv"], "w", newline="") as f:
        sw = csv.writer(f)
        sw.writerow(["gpu", "mode", "metric", "value"])
        for g, m, k, v in rows:
            sw.writerow([g, m, k, f"{v:.4f}" if isinstance(v, float) else v])
    with open(paths[".json"], "w") as f:
        json.dump({"card": gpu, "config": cfg, "sequence_digest": digest, "runs": results}, f,
                  indent=1, default=str)
    print("\n".join(lines))
    print("files: " + ", ".join(os.path.basename(p) for p in paths.values()) + f" in {a.out}")
    return 1 if failed or not results else 0


def self_test():
    """Checks the parts that need no torch: arguments, the sequence, CSV rows, medians and
    ratios on made-up runs. Prints "self-test: ok" or raises."""
    import contextlib
    import io
    a = parse_args([])
    assert (a.steps, a.warmup, a.batch, a.seq_min, a.seq_max, a.d_model, a.nhead, a.layers) == \
        (120, 10, 16, 64, 512, 512, 8, 4), vars(a)
    assert a.mode_list == list(BASE_MODES) and a.device == "cuda" and a.reps >= a.min_reps >= 3
    d = parse_args(["--dry-run", "--steps", "20", "--extra-mode", "x=cache:off"])
    assert d.device == "cpu" and d.steps == 20 and d.d_model == 32
    assert d.mode_list[-1] == "x" and d.mode_table["x"] == (None, "cache:off", True)
    for bad in (["--modes", "native,bogus"], ["--modes", "native,native"], ["--steps", "5"],
                ["--seq-min", "600"], ["--d-model", "100"], ["--extra-mode", "native=x"],
                ["--extra-mode", "noequals"]):
        with contextlib.redirect_stderr(io.StringIO()):
            try:
                parse_args(bad)
            except SystemExit as e:
                assert e.code == 2, bad
            else:
                raise AssertionError(f"accepted {bad}")
    seq = seq_lengths(1234, 120, 64, 512)
    assert seq == seq_lengths(1234, 120, 64, 512) and seq != seq_lengths(1235, 120, 64, 512)
    assert min(seq) >= 64 and max(seq) <= 512 and len(set(seq)) > 60
    assert seq_digest(seq) == seq_digest(list(seq)) != seq_digest(seq[:-1])
    env = mode_env("streamalloc_fast", {"device": "cuda", "modes": BASE_MODES})
    assert env["STREAMALLOC_CONF"] == "release:fast" and "PYTORCH_CUDA_ALLOC_CONF" not in env
    env = mode_env("cudaMallocAsync", {"device": "cpu", "modes": BASE_MODES})
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "backend:cudaMallocAsync"
    assert env["STREAMALLOC_BACKEND"] == "sim" and "STREAMALLOC_CONF" not in env

    def run(mode, sps, held, ok=True):
        return {"mode": mode, "ok": ok, "steps_per_s": sps, "held_mib": held, "final_loss": 2.5,
                "proc_mib": None}
    results = [run("native", 10.0, 2000.0), run("native", 12.0, 2100.0), run("native", 11.0, 1900.0),
               run("cudaMallocAsync", 9.0, 2000.0), run("cudaMallocAsync", 9.5, 2200.0),
               run("cudaMallocAsync", 8.0, 2100.0),
               run("streamalloc", 11.5, 2150.0), run("streamalloc", 11.0, 2050.0),
               run("streamalloc", 12.0, 2000.0), run("streamalloc", 1.0, 9999.0, ok=False),
               run("streamalloc_fast", 13.2, 4200.0)]
    lines, rows = summarize(results, list(BASE_MODES), "Card X")
    got = {(m, k): v for g, m, k, v in rows if g == "Card X"}
    assert got[("native", "steps_per_s_median")] == 11.0
    assert got[("cudaMallocAsync", "held_mib_median")] == 2100.0
    assert got[("streamalloc", "runs_ok")] == 3                     # the failed run is left out
    assert abs(got[("streamalloc", "ratio_held_mib_over_cudaMallocAsync")] - 2050 / 2100) < 1e-12
    assert abs(got[("streamalloc", "ratio_steps_per_s_over_native")] - 11.5 / 11.0) < 1e-12
    assert abs(got[("streamalloc_fast", "ratio_held_mib_over_cudaMallocAsync")] - 2.0) < 1e-12
    assert ("streamalloc", "ratio_proc_mib_over_cudaMallocAsync") not in got  # no nvidia-smi figure
    text = "\n".join(" ".join(line.split()) for line in lines)
    assert "streamalloc held / cudaMallocAsync held 0.976 goal <= 1.05: met" in text, text
    assert "streamalloc_fast held / cudaMallocAsync held 2.000 goal <= 1.05: MISSED" in text
    assert "streamalloc 3/4 11.50 2050" in text, text
    assert "(max - min) / median: native 18.2%, cudaMallocAsync 16.7%" in text, text
    row = csv_row("Card X", {**results[0], "rep": 1, "position": 2, "reserved_mib": 1.25},
                  vars(a))
    assert list(row) == RUN_FIELDS and row["gpu"] == "Card X" and row["steps_per_s"] == "10.000"
    assert row["reserved_mib"] == "1.2" and row["proc_mib"] == "" and row["ok"] == 1
    print("self-test: ok")
    return 0


def conf_text(entry):
    torch_conf, sa_conf, installs = entry
    if installs:
        return f"streamalloc_torch.install(), STREAMALLOC_CONF={sa_conf or '(unset)'}"
    return f"PYTORCH_CUDA_ALLOC_CONF={torch_conf or '(unset)'}"


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2], sys.argv[3]))
    if sys.argv[1:] == ["--self-test"]:
        sys.exit(self_test())
    sys.exit(main(sys.argv[1:]))
