"""Benchmark: the cost of leaving the Lipschitz tracker on (GitHub issue #3, item 7).

For the paper's MLP (784-512-256-10, M = 128, bundled MNIST digits) and ConvNet
(Table 1, 3×32×32 inputs, M = 256, the CIFAR-shaped stand-in built from the bundled
digits), in one process:

- the median wall time of a plain SGD step (zero_grad, forward, per-sample losses,
  ``losses.mean().backward()``, ``optimizer.step()``),
- the median time of the same step with full tracking every step (factored engine, all
  terms including the Prop 6 split, record written to SQLite),
- the same with the materialised engine (``torch.func.vmap`` per-sample gradients, the
  paper's approach) as the baseline,
- (issue #30) the exact (``factored``, the ``"fast"`` route) and amortised (``factored-auto``)
  geometry routes side by side with their worst accepted a posteriori bound, and an
  untracked ``vmap`` step (per-sample gradients of every parameter, their mean as the
  gradient) as the cost of per-sample gradients of the same model; also the issue #17
  transformer and torchvision resnet18 (eval mode, and ``resnet18-train``: batch statistics,
  the coupled engine).

Plain and tracked steps are interleaved (one of each in turn, on identical model copies,
on the same pre-loaded batches) so that background load affects them alike; data loading
is not timed. Peak memory is measured in fresh subprocesses per configuration (median of
``--memory-repeats``) as the process's peak resident set size during the timed steps
(the kernel's VmHWM, reset after the setup through /proc/self/clear_refs), both in total
and above the resident size when the steps start — torch's CPU allocations are
invisible to tracemalloc, and the setup alone peaks higher than an MLP step.

Prints one line per model ending in ``tracked/plain = <ratio>`` (factored engine).

Usage::

    python experiments/bench_tracking.py                 # both models, timing + memory
    python experiments/bench_tracking.py --models mlp --steps 30 --no-memory
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sdelip.workbench.data import load_dataset  # noqa: E402
from sdelip.workbench.models import build_model  # noqa: E402
from sdelip.tracking.tracker import Tracker  # noqa: E402

CONFIGS = {
    "mlp": {"model": "mlp", "dataset": "mnist-embedded", "batch_size": 128, "lr": 0.01},
    "convnet": {"model": "convnet", "dataset": "cifar-standin", "batch_size": 256, "lr": 1e-3},
    # issue #17: a 4-layer d = 128 transformer classifier on random tokens (M = 32, T = 32), position
    # indices expanded over the batch (the factored path) or a broadcast (T, d) position table (since issue
    # #27 the broadcast route, sdelip.rules.broadcast; the general path, per-sample output gradients by a
    # batched backward, with the factored-nobroadcast variant), and torchvision's resnet18 in
    # eval mode on 3×32×32 inputs (M = 64)
    "transformer": {"model": "transformer", "dataset": "tokens", "batch_size": 32, "lr": 0.01, "T": 32},
    "transformer-broadcast-pos": {"model": "transformer", "dataset": "tokens", "batch_size": 32, "lr": 0.01,
                                  "T": 32, "broadcast_positions": True},
    "resnet18": {"model": "resnet18", "dataset": "cifar-standin", "batch_size": 64, "lr": 0.01},
    # issue #30: resnet18 in train mode (BatchNorm with batch statistics: the coupled engine), M = 16
    "resnet18-train": {"model": "resnet18", "dataset": "cifar-standin", "batch_size": 16, "lr": 0.01, "train": True},
    # issue #27: outside models as shipped (small random-init configs, make_outside): Hugging Face GPT-2 and BERT
    # (positions arange(T) with a size-1 batch axis, broadcast over the batch) and timm's vit_tiny (cls_token and
    # pos_embed: bare parameters of the root module); the "-nobroadcast" variant of the engine shows the before
    "hf-gpt2": {"model": "hf-gpt2", "dataset": "tokens", "batch_size": 32, "lr": 0.01, "T": 32},
    "hf-bert": {"model": "hf-bert", "dataset": "tokens", "batch_size": 32, "lr": 0.01, "T": 32},
    "timm-vit-tiny": {"model": "timm-vit-tiny", "dataset": "cifar-standin", "batch_size": 32, "lr": 0.01},
}


class OutsideClassifier(torch.nn.Module):
    """A library model as shipped, returning logits (M, classes) for the bench's per-sample cross-entropy.

    hf-gpt2: ``GPT2LMHeadModel`` (n_embd 128, 4 layers, 4 heads, vocab 1000, dropout 0.1), the logits of the
    next token after the last position (the loss of the last position; the forward and backward run over all
    T positions); hf-bert: ``BertForSequenceClassification`` (hidden 128, 4 layers, 4 heads, intermediate 512,
    vocab 1000, 10 labels); timm-vit-tiny: ``vit_tiny_patch16_224`` at img_size 32, patch 4 (64 patches and the
    class token; width 192, 12 blocks, 3 heads as shipped), 10 classes.
    """

    def __init__(self, name: str):
        super().__init__()
        self.kind = name
        if name == "hf-gpt2":
            import transformers

            cfg = transformers.GPT2Config(vocab_size=1000, n_positions=64, n_embd=128, n_layer=4, n_head=4)
            self.model = transformers.GPT2LMHeadModel(cfg)
        elif name == "hf-bert":
            import transformers

            cfg = transformers.BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                          intermediate_size=512, max_position_embeddings=64, num_labels=10)
            self.model = transformers.BertForSequenceClassification(cfg)
        else:
            import timm

            self.model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4,
                                           num_classes=10)

    def forward(self, x):
        if self.kind == "hf-gpt2":
            return self.model(input_ids=x).logits[:, -1]
        if self.kind == "hf-bert":
            return self.model(input_ids=x).logits
        return self.model(x)


def make_outside(cfg: dict, seed: int = 0):
    """The model of an outside-library configuration (OutsideClassifier) and its SGD optimizer."""
    torch.manual_seed(seed)
    model = OutsideClassifier(cfg["model"])
    return model, torch.optim.SGD(model.parameters(), lr=cfg["lr"])


class TransformerClassifier(torch.nn.Module):
    """Token and position embeddings, a TransformerEncoder (pre-norm, GELU), mean pooling, a linear head."""

    def __init__(self, vocab=1000, d=128, heads=4, layers=4, T=32, classes=10, broadcast_positions=False):
        super().__init__()
        nn = torch.nn
        self.broadcast_positions = broadcast_positions
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(T, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.1, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens):
        M, T = tokens.shape
        positions = torch.arange(T, device=tokens.device)
        if not self.broadcast_positions:
            positions = positions.expand(M, T)
        return self.head(self.enc(self.tok(tokens) + self.pos(positions)).mean(1))


def batches(cfg: dict, n: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    M = cfg["batch_size"]
    if cfg["dataset"] == "tokens":
        return [(torch.randint(0, 1000, (M, cfg["T"]), generator=g), torch.randint(0, 10, (M,), generator=g))
                for _ in range(n)]
    info = load_dataset(cfg["dataset"])
    ds = info.dataset
    out = []
    for _ in range(n):
        idx = torch.randint(0, len(ds), (M,), generator=g).tolist()
        items = [ds[i] for i in idx]
        x = torch.stack([it[0] for it in items])
        y = torch.tensor([int(it[1]) for it in items])
        out.append((x.contiguous(), y))
    return out


def make(cfg: dict, seed: int = 0):
    if cfg["model"] in ("hf-gpt2", "hf-bert", "timm-vit-tiny"):
        return make_outside(cfg, seed)
    if cfg["model"] == "transformer":
        torch.manual_seed(seed)
        model = TransformerClassifier(T=cfg["T"], broadcast_positions=cfg.get("broadcast_positions", False))
    elif cfg["model"] == "resnet18":
        import torchvision

        torch.manual_seed(seed)
        model = torchvision.models.resnet18(num_classes=10)
        if not cfg.get("train"):
            model.eval()  # BatchNorm with running statistics
    else:
        info_shape = (1, 28, 28) if cfg["model"] == "mlp" else (3, 32, 32)
        model = build_model(cfg["model"], input_shape=info_shape, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"])
    return model, opt


def plain_step(model, opt, x, y) -> None:
    opt.zero_grad()
    losses = F.cross_entropy(model(x), y, reduction="none")
    losses.mean().backward()
    opt.step()


def tracked_step(tracker, model, opt, x, y) -> None:
    opt.zero_grad()
    losses = F.cross_entropy(model(x), y, reduction="none")
    tracker.backward(losses, batch=(x, y))
    opt.step()


def make_vmap_step(model):
    """A plain step by ``torch.func`` per-sample gradients of every parameter (the issue #30 baseline).

    ``vmap(grad(loss_i))`` over the samples, attention dropout drawn per sample
    (:class:`sdelip.rules.attention.vmap_safe_attention`, ``randomness="different"``), the
    mean of the per-sample gradients as ``p.grad``, then ``optimizer.step()``: what a user
    who wants per-sample gradients of the same model pays, without any of the tracker's terms.
    """
    from torch.func import functional_call, grad, vmap

    from sdelip.rules.attention import vmap_safe_attention

    buffers = dict(model.named_buffers())

    def loss1(params, x, y):
        return F.cross_entropy(functional_call(model, (params, buffers), (x[None],)), y[None])

    per_sample = vmap(grad(loss1), in_dims=(None, 0, 0), randomness="different")

    def step(opt, x, y):
        opt.zero_grad()
        params = {n: p.detach() for n, p in model.named_parameters()}
        with vmap_safe_attention():
            grads = per_sample(params, x, y)
        for n, p in model.named_parameters():
            p.grad = grads[n].mean(0)
        opt.step()

    return step


#: Untracked baselines timed beside the tracked variants (``--engines``): per-sample gradients of the
#: whole model by ``torch.func.vmap`` (``vmap``; not for BatchNorm in training mode, which couples the samples).
BASELINES = ("vmap",)

#: Tracked configurations: name -> (engine, Tracker keyword arguments).
VARIANTS = {
    "factored": ("factored", {}),
    "factored-nosplit": ("factored", {"split": False}),
    "factored-svd": ("factored", {"decomposition": "svd"}),
    # issue #30: the amortised geometry route (sdelip.core.amortised) for every layer, or under "auto"
    # for the layers with min(m, n) >= AUTO_MIN_DIM (the others on "fast")
    "factored-amortised": ("factored", {"decomposition": "amortised"}),
    "factored-auto": ("factored", {"decomposition": "auto"}),
    "factored-t1": ("factored", {"threads": 1}),
    "materialised": ("materialised", {}),
    # issue #27: broadcast uses by the batched backward / the per-module fallback (the route before the issue)
    "factored-nobroadcast": ("factored", {"broadcast_uses": False}),
}


def make_tracker(model, opt, variant: str, record: str, decomposition: str) -> Tracker:
    import functools

    engine, kw = VARIANTS[variant]
    if engine == "factored" and model.training and any(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        engine = "coupled"  # resnet18-train: batch statistics couple the samples (the factored engine refuses)
    kw = {"decomposition": decomposition, **kw}
    broadcast_uses = kw.pop("broadcast_uses", None)
    tracker = Tracker(
        model, opt, record=record, overwrite=True, engine=engine,
        loss_fn=functools.partial(F.cross_entropy, reduction="none"), on_degenerate="ignore", **kw,
    )
    if broadcast_uses is not None:  # sdelip.rules.broadcast on or off for this engine
        tracker.engine.broadcast_uses = broadcast_uses
    return tracker


def _to(model_opt, device):
    model, opt = model_opt
    model.to(device)  # in place: the optimizer keeps the same parameter objects
    return model, opt


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_configs(name: str, steps: int, warmup: int, engines: list[str], decomposition: str,
                 device: str = "cpu") -> dict:
    cfg = CONFIGS[name]
    data = [(x.to(device), y.to(device)) for x, y in batches(cfg, 8)]
    runs = {"plain": _to(make(cfg), device)}
    trackers = {}
    tmp = tempfile.mkdtemp(prefix="bench_tracking_")
    for eng in engines:
        if cfg.get("train") and (eng in BASELINES or VARIANTS[eng][0] != "factored"):
            continue  # batch statistics: only the coupled engine applies (make_tracker); per-sample gradients
            # of a batch-statistics network (vmap, materialised) are not those of its loss
        model, opt = _to(make(cfg), device)
        runs[eng] = (model, opt)
        if eng in BASELINES:
            trackers[eng] = make_vmap_step(model)
            continue
        trackers[eng] = make_tracker(model, opt, eng, os.path.join(tmp, f"{name}_{eng}.db"), decomposition)
    times = {k: [] for k in runs}
    for k in range(warmup + steps):
        x, y = data[k % len(data)]
        for key, (model, opt) in runs.items():
            _sync(device)
            t0 = time.perf_counter()
            if key == "plain":
                plain_step(model, opt, x, y)
            elif key in BASELINES:
                trackers[key](opt, x, y)
            else:
                tracked_step(trackers[key], model, opt, x, y)
            _sync(device)
            dt = time.perf_counter() - t0
            if k >= warmup:
                times[key].append(dt)
    out = {k: statistics.median(v) for k, v in times.items()}
    for key, tr in trackers.items():
        if key in BASELINES:
            continue
        geo = tr.metadata.get("geometry")
        if geo is not None:  # the amortised route: its worst accepted a posteriori bound and fall-backs
            out[f"{key}:geometry"] = {k: v for k, v in geo.items() if k != "layers"}
        tr.close()
    return out


def breakdown(name: str, steps: int, warmup: int, decomposition: str) -> dict:
    """Where a tracked step's time goes: the tracker's parts timed inside real steps (wrapped calls)."""
    import contextlib

    from sdelip import rules
    from sdelip.engines.factored import FactoredEngine
    from sdelip.record import RecordWriter

    cfg = CONFIGS[name]
    data = batches(cfg, 8)
    model, opt = make(cfg)
    tmp = tempfile.mkdtemp(prefix="bench_breakdown_")
    tracker = make_tracker(model, opt, "factored", os.path.join(tmp, f"{name}.db"), decomposition)
    acc: dict = {}
    on = [False]

    def timed(owner, attr, label):
        fn = getattr(owner, attr)

        def wrapper(*a, **kw):
            if not on[0]:
                return fn(*a, **kw)
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                acc[label] = acc.get(label, 0.0) + time.perf_counter() - t0
        return fn, wrapper

    patches = [
        (type(tracker), "_decompose_all", "decompositions (Lemma 12-13)"),
        (FactoredEngine, "backward", "engine backward (total)"),
        (FactoredEngine, "_resolve_batch_axes", "batch-axis probe + general per-sample deltas"),
        (FactoredEngine, "_check_hidden_uses", "hidden-use check"),
        (type(tracker), "_all_terms", "Thm 14 terms"),
        (RecordWriter, "write", "record write"),
    ]
    for rule in {type(r) for r in rules.registered_rules().values()} | {rules.FallbackRule}:
        for attr in ("statistics", "per_sample_grads"):  # wrapped on the class that defines it (LinearUses...)
            owner = next((c for c in rule.__mro__ if attr in vars(c)), None)
            if owner is not None and (owner, attr) not in {(o, a) for o, a, _ in patches}:
                patches.append((owner, attr, "rule statistics (docs/theory.md §8)"))
    saved = []
    for owner, attr, label in patches:
        if attr in vars(owner):
            fn, wrapper = timed(owner, attr, label)
            saved.append((owner, attr, fn))
            setattr(owner, attr, wrapper)
    total = 0.0
    try:
        for k in range(warmup + steps):
            x, y = data[k % len(data)]
            on[0] = k >= warmup
            if on[0] and k == warmup:
                acc.clear()
            t0 = time.perf_counter()
            tracked_step(tracker, model, opt, x, y)
            if on[0]:
                total += time.perf_counter() - t0
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)
        with contextlib.suppress(Exception):
            tracker.close()
    out = {k: v / steps for k, v in acc.items()}
    inner = sum(out.get(k, 0.0) for k in ("rule statistics (docs/theory.md §8)", "hidden-use check",
                                           "batch-axis probe + general per-sample deltas"))
    out["autograd backward with hooks"] = out.pop("engine backward (total)", 0.0) - inner
    out["tracked step (total)"] = total / steps
    out["forward, optimizer step, rest"] = out["tracked step (total)"] - sum(
        v for k, v in out.items() if k != "tracked step (total)")
    return out


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux ≥ 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_child(name: str, engine: str, steps: int, decomposition: str, threads: int) -> dict:
    """Peak resident memory of training steps, in a fresh process.

    The setup (imports, data, model, tracker) peaks higher than an MLP step, so the
    kernel's peak counter is reset after the setup: ``peak_kib`` is the peak RSS during
    the steps, ``setup_kib`` the RSS when they start. Without /proc/self/clear_refs the
    process-lifetime ``ru_maxrss`` is reported instead.
    """
    import gc

    torch.set_num_threads(threads)
    cfg = CONFIGS[name]
    data = batches(cfg, 4)
    model, opt = make(cfg)
    tracker = vstep = None
    if engine in BASELINES:
        vstep = make_vmap_step(model)
    elif engine != "plain":  # a tracked variant
        tmp = tempfile.mkdtemp(prefix="bench_tracking_mem_")
        tracker = make_tracker(model, opt, engine, os.path.join(tmp, "rec.db"), decomposition)
    gc.collect()
    reset = _reset_peak_rss()
    setup = _status_kib("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for k in range(steps):
        x, y = data[k % len(data)]
        if vstep is not None:
            vstep(opt, x, y)
        elif tracker is None:
            plain_step(model, opt, x, y)
        else:
            tracked_step(tracker, model, opt, x, y)
    peak = _status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if tracker is not None:
        tracker.close()
    return {"setup_kib": setup, "peak_kib": peak, "reset": reset}


def measure_memory(name: str, engine: str, steps: int, decomposition: str, threads: int, repeats: int,
                   fixed_mmap: bool = True) -> dict:
    """Median over ``repeats`` fresh processes of the setup and peak resident set sizes.

    With ``fixed_mmap`` the children run with glibc's mmap threshold fixed at 64 KiB
    (``MALLOC_MMAP_THRESHOLD_``): every block of 64 KiB or more is returned to the system
    when freed, so the resident size follows live memory. glibc's default dynamic
    threshold keeps freed blocks of up to 32 MiB in the heap, which makes peak RSS vary by
    ±25 MiB between identical runs.
    """
    runs = []
    env = {**os.environ}
    if fixed_mmap:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    for _ in range(repeats):
        cmd = [sys.executable, __file__, "--_memory-child", name, engine, str(steps), decomposition, str(threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]} | {"runs": runs}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mlp", "convnet", "transformer", "resnet18", "resnet18-train"],
                    choices=sorted(CONFIGS))
    ap.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 40 MLP, 12 ConvNet)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-baseline", action="store_true", help="skip the materialised engine")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--memory-steps", type=int, default=5)
    ap.add_argument("--decomposition", default="fast", choices=["fast", "svd", "gram", "amortised", "auto"])
    ap.add_argument("--engines", nargs="+", default=["factored", "factored-auto", "vmap", "materialised"],
                    choices=sorted(VARIANTS) + list(BASELINES),
                    help="tracked configurations to time (the first one gives tracked/plain)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--memory-repeats", type=int, default=3)
    ap.add_argument("--default-malloc", action="store_true",
                    help="measure memory with glibc's default (dynamic) mmap threshold")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--breakdown", action="store_true", help="also time the tracker's parts inside tracked steps")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (memory is measured on CPU only)")
    ap.add_argument("--_memory-child", nargs=5, metavar=("MODEL", "ENGINE", "STEPS", "DECOMP", "THREADS"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._memory_child:
        name, engine, steps, decomp, threads = args._memory_child
        print(json.dumps(memory_child(name, engine, int(steps), decomp, int(threads))))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    engines = [e for e in args.engines if not (args.no_baseline and e == "materialised")]
    main_variant = engines[0]

    print(f"# machine: {machine()}")
    if torch.device(args.device).type == "cuda":
        print(f"# device: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    print(f"# load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"# decomposition={args.decomposition}, torch threads={threads}; times are medians over interleaved "
          f"steps (data loading excluded); memory = median over {args.memory_repeats} processes of the peak RSS"
          f"{'' if args.default_malloc else ' (glibc mmap threshold fixed at 64 KiB)'}")
    results = {"machine": machine(), "decomposition": args.decomposition, "threads": threads,
               "load_start": os.getloadavg(), "models": {}}
    for name in args.models:
        steps = args.steps or (40 if name == "mlp" else 12)
        t = time_configs(name, steps, args.warmup, engines, args.decomposition, args.device)
        res = {"time_s": t, "steps": steps}
        parts = [f"{name} (M={CONFIGS[name]['batch_size']}): plain {t['plain'] * 1e3:.1f} ms"]
        for eng in engines:
            if eng not in t:
                continue
            parts.append(f"{eng} {t[eng] * 1e3:.1f} ms ({eng}/plain = {t[eng] / t['plain']:.2f})")
            geo = t.get(f"{eng}:geometry")
            if geo is not None:
                parts.append(f"{eng}: {geo['amortised_layer_steps']} amortised / {geo['exact_layer_steps']} exact "
                             f"layer-steps, {geo['bound_fallbacks']} fall-backs, worst bound "
                             f"{geo['worst_error_bound']:.1e}")
        if not args.no_memory:
            mem = {eng: measure_memory(name, eng, args.memory_steps, args.decomposition, threads,
                                       args.memory_repeats, not args.default_malloc)
                   for eng in ["plain"] + [e for e in engines if e in t]}
            res["memory_kib"] = mem
            base = mem["plain"]
            for eng in [e for e in engines if e in t]:
                r = mem[eng]["peak_kib"] / base["peak_kib"]
                inc_p = max(1, base["peak_kib"] - base["setup_kib"])
                inc_e = mem[eng]["peak_kib"] - mem[eng]["setup_kib"]
                parts.append(f"peak RSS {eng}/plain = {r:.2f} ({mem[eng]['peak_kib'] / 1024:.0f} / "
                             f"{base['peak_kib'] / 1024:.0f} MiB; above setup {inc_e / 1024:.0f} / "
                             f"{inc_p / 1024:.0f} MiB = {inc_e / inc_p:.2f})")
        parts.append(f"tracked/plain = {t[main_variant] / t['plain']:.2f}")
        print(", ".join(parts), flush=True)
        if args.breakdown:
            b = breakdown(name, steps, args.warmup, args.decomposition)
            res["breakdown_s"] = b
            tot = b["tracked step (total)"]
            print(f"  {name} where the time goes (ms per tracked step, share of it): " + "; ".join(
                f"{k} {v * 1e3:.1f} ({v / tot:.0%})" for k, v in sorted(b.items(), key=lambda kv: -kv[1])
                if k != "tracked step (total)") + f"; total {tot * 1e3:.1f}", flush=True)
        results["models"][name] = res
    worst = [(r["time_s"][f"{e}:geometry"]["worst_error_bound"], m, e) for m, r in results["models"].items()
             for e in engines if f"{e}:geometry" in r["time_s"]]
    if worst:
        b, m, e = max(worst)
        print(f"# worst accepted a posteriori bound of the amortised route: {b:.1e} ({m}, {e}; tolerance 1e-8)")
        results["worst_error_bound"] = b
    print(f"# load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    results["load_end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
