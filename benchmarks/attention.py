"""HLIP's hierarchical attention versus full (study-wide) attention: training speed and peak memory.

Times forward + backward of the vision tower alone (the text tower is not part of the attention
claim) for 1, 2, 4, 8 (optionally 40) scans per study, for the hierarchical layouts

* ``h2``: scan, scan, study (repeated to the depth),
* ``h3``: slice, scan, study (repeated to the depth),

and for ``full`` attention (every block study-wide, the naive 3D-CLIP baseline), all with the same
weights (one state dict loaded into every layout), with the fused attention kernel and with the
math (non-fused) kernel, without gradient checkpointing. Each configuration runs in a fresh
process, so its peak memory is its own: after one warm-up step, on CPU the RSS high-water mark over
the timed steps (reset through ``/proc/self/clear_refs``; large allocations are forced to ``mmap``
so that freed tensors leave RSS) minus the RSS before them, on CUDA
``torch.cuda.max_memory_allocated`` minus the allocation before them. Gradients are freed after
every step, so this is the peak of one forward+backward beyond the resident model and input.

Every row carries the FLOP bound: total multiply-adds of the same forward pass with full attention
divided by those of the layout (see :func:`forward_macs`); backward costs a fixed multiple of the
forward per operation, so the bound holds for forward + backward.

    python -m benchmarks.attention --json attention.json                   # CPU default, minutes
    python -m benchmarks.attention --device cuda --json attention-gpu.json # ViT-B presets, 12 blocks

The CPU default runs two models: a bound- and memory-preserving scale model of ViT-B (width 192,
12 heads, 294 tokens per scan of 8x8x8 voxels: the same attention/linear FLOP ratio and the same ratio of attention
matrices to token activations per study as ViT-B at 1176 tokens) for the whole sweep, and the ViT-B
width itself (768, 12 heads, 1176 tokens per scan) with one period of the layout (3 blocks) for the
headline figures (h2 against full at 8 scans, fused kernel; one timed step, no warm-up step, as a
step takes minutes on CPU). Patch dropout is timed separately (h2,
8 scans, drop ratios 0.25 and 0.5 against none).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path


from benchmarks.common import machine, mem_available_bytes, table, write_json

PERIODS = {"h2": ["scan", "scan", "study"], "h3": ["slice", "scan", "study"]}


@dataclass
class ModelSpec:
    name: str
    width: int
    heads: int
    depth: int
    img_size: list[int]
    patch_size: list[int]
    mlp_ratio: float = 4.0
    embed_dim: int = 512

    @classmethod
    def of(cls, name: str, vision, depth: int | None = None) -> "ModelSpec":
        """The spec of a vision config (``model.vision``), optionally cut to ``depth`` blocks."""
        return cls(name, vision.width, vision.heads, depth or vision.depth, list(vision.img_size),
                   list(vision.patch_size), vision.mlp_ratio)

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(s // p for s, p in zip(self.img_size, self.patch_size))

    @property
    def tokens_per_scan(self) -> int:
        return math.prod(self.grid)

    def levels(self, layout: str) -> list[str]:
        if layout == "full":
            return ["study"] * self.depth
        period = PERIODS[layout]
        return [period[i % len(period)] for i in range(self.depth)]

    def describe(self) -> str:
        return (f"{self.name}: width {self.width}, {self.heads} heads, {self.depth} blocks, "
                f"{self.img_size[0]}x{self.img_size[1]}x{self.img_size[2]} scans, patch "
                f"{self.patch_size[0]}x{self.patch_size[1]}x{self.patch_size[2]} -> {self.tokens_per_scan} tokens/scan")


def preset_spec(preset: str, depth: int | None = None) -> ModelSpec:
    from hlip_fed.config import load_config

    v = load_config(preset).model.vision
    d = depth or v.depth
    return ModelSpec.of(preset if d == v.depth else f"{preset} ({d} blocks)", v, d)


# The CPU sweep model: ViT-B scaled by 1/4 in width and 1/4 in tokens per scan. Linear MACs per
# token scale with width^2 and attention MACs per token with (window tokens) x width, so the
# attention share of every block -- hence the FLOP bound -- is the same as ViT-B at 1176 tokens;
# keeping 12 heads keeps the size of the attention matrices relative to the token activations.
SCALE_MODEL = ModelSpec("ViT-B scale model (1/4 width, 1/4 tokens)", 192, 12, 3, [48, 56, 56], [8, 8, 8])
VITB_PERIOD = ModelSpec("ViT-B width, one period", 768, 12, 3, [48, 224, 224], [8, 16, 16])
QUICK_MODEL = ModelSpec("quick test model", 32, 2, 3, [16, 32, 32], [8, 16, 16])


# --- the FLOP bound ----------------------------------------------------------------------------


def forward_macs(spec: ModelSpec, levels: list[str], scans: int, patch_dropout: float = 0.0) -> float:
    """Multiply-adds of one study's forward pass through the vision tower.

    Per block with ``w`` windows of ``L`` tokens each (``L`` counts the window's CLS copy), width
    ``d`` and MLP ratio ``r``:

    * QKV, output projection and MLP: ``w * L * (4 + 2r) * d^2``,
    * attention (``Q K^T`` and ``A V``): ``2 * w * L^2 * d``,

    plus the patch embedding, ``tokens * d * voxels per patch``, which no layout changes. Norms,
    softmax and the final projection are left out (linear in the token count and small).
    Patch dropout keeps ``round(T * (1 - p))`` tokens per scan (per depth slab when the layout has
    slice-level blocks), exactly as :meth:`HLIPVisionTransformer.drop_patches` does.
    """
    d, r = spec.width, spec.mlp_ratio
    slabs, _, _ = spec.grid
    slab_tokens = spec.tokens_per_scan // slabs
    macs = scans * spec.tokens_per_scan * d * math.prod(spec.patch_size)
    if patch_dropout:
        if "slice" in levels:
            slab_tokens = max(1, int(round(slab_tokens * (1 - patch_dropout))))
        else:
            slab_tokens, slabs = max(1, int(round(spec.tokens_per_scan * (1 - patch_dropout)))), 1
    tokens = scans * slabs * slab_tokens
    for level in levels:
        windows = {"slice": scans * slabs, "scan": scans, "study": 1}[level]
        length = tokens // windows + 1
        macs += windows * length * (4 + 2 * r) * d * d + 2 * windows * length * length * d
    return float(macs)


def bound(spec: ModelSpec, layout: str, scans: int) -> float:
    return forward_macs(spec, spec.levels("full"), scans) / forward_macs(spec, spec.levels(layout), scans)


# --- one configuration, in its own process -----------------------------------------------------


@dataclass
class Job:
    spec: dict
    layout: str
    scans: int
    kernel: str
    device: str
    precision: str
    weights: str
    warmup: int = 1
    steps: int = 3
    threads: int = 0
    patch_dropout: float = 0.0
    batch: int = 1
    extra: dict = field(default_factory=dict)


def run_job(job: Job) -> dict:
    """Build the tower, load the shared weights, time ``steps`` forward+backward passes.

    With ``job.extra["interleave"]`` (a list of layouts) the child builds one tower per layout and
    times them in turn, step by step with the order rotated every round, so that a change in the
    machine's load hits every layout alike; it then reports times only, no memory.
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from benchmarks.common import peak_rss_bytes, reset_peak_rss, rss_bytes
    from hlip_fed.config import AttentionConfig, VisionConfig
    from hlip_fed.model.vision import HLIPVisionTransformer

    if job.threads:
        torch.set_num_threads(job.threads)
    spec = ModelSpec(**job.spec)
    cuda = job.device.startswith("cuda")
    state = torch.load(job.weights, weights_only=True)

    def build(layout: str):
        cfg = VisionConfig(
            img_size=spec.img_size, patch_size=spec.patch_size, width=spec.width, depth=spec.depth,
            heads=spec.heads, mlp_ratio=spec.mlp_ratio, drop_path=0.0, max_scans=max(40, job.scans),
            patch_dropout=job.patch_dropout, grad_checkpointing=False,
            attention=AttentionConfig(mode="full" if layout == "full" else "hierarchical",
                                      levels=spec.levels("h2" if layout == "full" else layout)),
        )
        model = HLIPVisionTransformer(cfg, spec.embed_dim)
        model.load_state_dict(state)
        return model.to(job.device).train()

    layouts = job.extra.get("interleave") or [job.layout]
    models = {layout: build(layout) for layout in layouts}
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(job.batch, job.scans, 1, *spec.img_size, generator=gen).to(job.device)
    backends = (
        [SDPBackend.MATH] if job.kernel == "math"
        else [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    )

    def step(model) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with sdpa_kernel(backends):
            if job.precision == "bf16":
                with torch.autocast(device_type=torch.device(job.device).type, dtype=torch.bfloat16):
                    out = model(images)
            else:
                out = model(images)
            out.float().square().mean().backward()
        if cuda:
            torch.cuda.synchronize()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    # Warm-up first: lazily loaded kernels and thread pools are a one-off cost of the process.
    for _ in range(job.warmup):
        for model in models.values():
            step(model)
    if len(layouts) > 1:
        times = {layout: [] for layout in layouts}
        for i in range(job.steps):
            order = layouts[i % len(layouts):] + layouts[:i % len(layouts)]
            for layout in order:
                times[layout].append(step(models[layout]))
        return {layout: {"seconds_per_step": statistics.median(t), "step_seconds": t,
                         "studies_per_s": job.batch / statistics.median(t)} for layout, t in times.items()}
    model = models[job.layout]
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_bytes()
        if not reset_peak_rss():
            raise RuntimeError("cannot reset the RSS high-water mark (/proc/self/clear_refs)")
    times = [step(model) for _ in range(job.steps)]
    peak = (torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()) - base
    median = statistics.median(times)
    return {"seconds_per_step": median, "step_seconds": times, "studies_per_s": job.batch / median,
            "peak_mb": peak / 2**20}


def estimate_bytes(spec: ModelSpec, layout: str, scans: int, kernel: str, batch: int = 1) -> float:
    """A rough peak for forward+backward in fp32 (to skip configurations that cannot fit)."""
    tokens = batch * scans * (spec.tokens_per_scan + 1)
    act = tokens * spec.width * 4 * (12 + 2 * spec.mlp_ratio) * spec.depth
    if kernel != "math":
        return act * 1.3
    mats = []
    for level in spec.levels(layout):
        windows = batch * {"slice": scans * spec.grid[0], "scan": scans, "study": 1}[level]
        length = batch * scans * spec.tokens_per_scan // windows + 1
        mats.append(windows * spec.heads * length * length * 4)
    return (act + sum(mats) + 2 * max(mats)) * 1.15


def run_in_child(job: Job, timeout: float) -> dict:
    env = dict(os.environ)
    # Large allocations always via mmap, so freed tensors leave RSS and the high-water mark is the peak.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "131072")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "benchmarks.attention", "--child", json.dumps(asdict(job))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        if proc.returncode in (-9, 137):
            tail = ["killed (out of memory)"]
        return {"error": tail[0][:200]}
    return json.loads(lines[-1])


# --- the sweep ---------------------------------------------------------------------------------


def sweep(spec: ModelSpec, layouts: list[str], scan_counts: list[int], kernels: list[str], args,
          weights: str, steps: int, label: str, interleave: bool = True) -> list[dict]:
    """Every layout at every scan count and kernel. With ``interleave``, times come from one child
    per (kernel, scans) that alternates the layouts step by step, and peak memory from one child
    per configuration (one step after the warm-up); without it, one child per configuration gives
    both (the headline, where a step takes minutes)."""
    rows = []
    budget = (mem_available_bytes() or 0) * 0.7 if args.device == "cpu" else None
    for kernel in kernels:
        for scans in scan_counts:
            group = []
            for layout in ["full"] + [x for x in layouts if x != "full"]:
                row = {"model": label, "kernel": kernel, "scans": scans, "layout": layout,
                       "tokens": scans * spec.tokens_per_scan, "bound": bound(spec, layout, scans)}
                need = estimate_bytes(spec, layout, scans, kernel)
                if budget is not None and need > budget:
                    row["error"] = f"skipped: needs about {need / 2**30:.0f} GiB"
                else:
                    job = Job(asdict(spec), layout, scans, kernel, args.device, args.precision, weights,
                              warmup=args.warmup, steps=1 if interleave else steps, threads=args.threads)
                    row.update(run_in_child(job, args.timeout))
                    if interleave and "error" not in row:
                        row["memory_step_seconds"] = row.pop("seconds_per_step")
                        for key in ("step_seconds", "studies_per_s"):
                            row.pop(key)
                group.append(row)
            live = [r["layout"] for r in group if "error" not in r]
            if interleave and live:
                job = Job(asdict(spec), live[0], scans, kernel, args.device, args.precision, weights,
                          warmup=args.warmup, steps=steps, threads=args.threads, extra={"interleave": live})
                timing = run_in_child(job, args.timeout * len(live))
                for r in group:
                    if r["layout"] in live:
                        if "error" in timing:
                            r["error"] = timing["error"]
                        else:
                            r.update(timing[r["layout"]])
            for row in group:
                print(f"  {label} | {kernel} | {scans} scans | {row['layout']}: "
                      + (row.get("error") or f"{row['studies_per_s']:.3f} studies/s, {row['peak_mb']:.0f} MB"),
                      file=sys.stderr, flush=True)
            rows.extend(group)
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    full = {(r["model"], r["kernel"], r["scans"]): r for r in rows if r["layout"] == "full"}
    for r in rows:
        f = full.get((r["model"], r["kernel"], r["scans"]))
        if f is None or "error" in r or "error" in f:
            continue
        r["speedup"] = r["studies_per_s"] / f["studies_per_s"]
        r["memory_ratio"] = r["peak_mb"] / f["peak_mb"] if f["peak_mb"] > 0 else None
        r["of_bound"] = r["speedup"] / r["bound"]


def patch_dropout_rows(spec: ModelSpec, scans: int, ratios: list[float], args, weights: str, steps: int,
                       label: str) -> list[dict]:
    rows = []
    base = None
    for p in [0.0] + ratios:
        job = Job(asdict(spec), "h2", scans, "fused", args.device, args.precision, weights,
                  warmup=args.warmup, steps=steps, threads=args.threads, patch_dropout=p)
        levels = spec.levels("h2")
        row = {"model": label, "layout": "h2", "kernel": "fused", "scans": scans, "patch_dropout": p,
               "bound": forward_macs(spec, levels, scans) / forward_macs(spec, levels, scans, p)}
        row.update(run_in_child(job, args.timeout))
        print(f"  patch dropout {p}: " + (row.get("error") or f"{row['studies_per_s']:.3f} studies/s"),
              file=sys.stderr, flush=True)
        if p == 0.0 and "error" not in row:
            base = row
        if base is not None and "error" not in row:
            row["speedup"] = row["studies_per_s"] / base["studies_per_s"]
            row["of_bound"] = row["speedup"] / row["bound"]
        rows.append(row)
    return rows


def save_weights(spec: ModelSpec, folder: Path) -> str:
    import torch

    from hlip_fed.config import AttentionConfig, VisionConfig
    from hlip_fed.model.vision import HLIPVisionTransformer

    torch.manual_seed(0)
    cfg = VisionConfig(img_size=spec.img_size, patch_size=spec.patch_size, width=spec.width, depth=spec.depth,
                       heads=spec.heads, mlp_ratio=spec.mlp_ratio, attention=AttentionConfig(levels=spec.levels("h2")))
    path = folder / f"weights-{spec.width}-{spec.depth}.pt"
    torch.save(HLIPVisionTransformer(cfg, spec.embed_dim).state_dict(), path)
    return str(path)


SWEEP_COLUMNS = [
    ("scans", "scans", "d"), ("layout", "layout", ""), ("tokens", "tokens", "d"),
    ("studies_per_s", "studies/s", ".3f"), ("peak_mb", "peak MB", ".0f"), ("speedup", "speed-up", ".2f"),
    ("bound", "bound", ".2f"), ("of_bound", "of bound", ".0%"), ("memory_ratio", "memory / full", ".2f"),
    ("error", "note", ""),
]


def headline(rows: list[dict], model: str, kernel: str, scans: int = 8, layout: str = "h2") -> dict | None:
    for r in rows:
        if (r["model"], r["kernel"], r["scans"], r["layout"]) == (model, kernel, scans, layout) and "speedup" in r:
            return r
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--scans", type=int, nargs="+", help="scans per study (default 1 2 4 8; CUDA adds 40)")
    ap.add_argument("--layouts", nargs="+", default=["h2", "h3"], choices=["h2", "h3"])
    ap.add_argument("--kernels", nargs="+", default=["fused", "math"], choices=["fused", "math"])
    ap.add_argument("--preset", help="model preset for the sweep (CUDA default: vit_base_multiscan_h2_token1176)")
    ap.add_argument("--depth", type=int, help="blocks of the preset or of the CPU scale model (default: the preset's, 3)")
    ap.add_argument("--no-headline", action="store_true", help="CPU: skip the ViT-B-width headline run")
    ap.add_argument("--patch-dropout", type=float, nargs="*", default=[0.25, 0.5])
    ap.add_argument("--precision", choices=["fp32", "bf16"], help="default fp32 on CPU, bf16 on CUDA")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, help="timed steps per configuration (default 3; headline 1 on CPU)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    ap.add_argument("--quick", action="store_true", help="a tiny model, 1 and 2 scans (a smoke test)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        print(json.dumps(run_job(Job(**json.loads(args.child)))), flush=True)
        return 0

    cuda = args.device.startswith("cuda")
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    if args.quick:
        sweep_spec, head_spec = QUICK_MODEL, None
        scans = args.scans or [1, 2]
        steps, head_steps = args.steps or 1, 1
    elif cuda or args.preset:
        sweep_spec = preset_spec(args.preset or "vit_base_multiscan_h2_token1176", args.depth)
        head_spec = None  # the sweep already runs the ViT-B width
        scans = args.scans or ([1, 2, 4, 8, 40] if cuda else [1, 2, 4, 8])
        steps, head_steps = args.steps or 3, 1
    else:
        sweep_spec = SCALE_MODEL if not args.depth else replace(
            SCALE_MODEL, depth=args.depth, name=f"{SCALE_MODEL.name}, {args.depth} blocks")
        head_spec = None if args.no_headline else VITB_PERIOD
        scans = args.scans or [1, 2, 4, 8]
        steps, head_steps = args.steps or 3, args.steps or 1
    head_scans = 8 if 8 in scans else max(scans)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"sweep: {sweep_spec.describe()}", file=sys.stderr)
        weights = save_weights(sweep_spec, Path(tmp))
        rows = sweep(sweep_spec, args.layouts, scans, args.kernels, args, weights, steps, sweep_spec.name)
        head_rows = []
        if head_spec is not None:
            print(f"headline: {head_spec.describe()}", file=sys.stderr)
            head_args = argparse.Namespace(**vars(args))
            head_args.warmup = 0 if args.steps is None else args.warmup  # minutes per step on CPU
            head_rows = sweep(head_spec, ["h2"], [head_scans], ["fused"], head_args,
                              save_weights(head_spec, Path(tmp)), head_steps, head_spec.name, interleave=False)
        pd_rows = []
        if args.patch_dropout:
            pd_rows = patch_dropout_rows(sweep_spec, head_scans, args.patch_dropout, args, weights, steps,
                                         sweep_spec.name)

    top_model = head_spec.name if head_spec else sweep_spec.name
    top = headline(head_rows or rows, top_model, "fused", head_scans)
    math_top = headline(rows, sweep_spec.name, "math", head_scans)
    all_rows = rows + head_rows
    pick = {(r["kernel"], r["layout"]): r for r in rows if r["scans"] == head_scans and "studies_per_s" in r}
    cross = None
    if ("fused", "h2") in pick and ("math", "full") in pick:  # hierarchical + fused against naive + math
        a, b = pick[("fused", "h2")], pick[("math", "full")]
        cross = {"model": sweep_spec.name, "scans": head_scans, "throughput_ratio": a["studies_per_s"] / b["studies_per_s"],
                 "memory_ratio": a["peak_mb"] / b["peak_mb"] if b["peak_mb"] > 0 else None}
    ok = [r for r in all_rows if r["layout"] != "full" and "speedup" in r]
    result = {
        "benchmark": "attention",
        "device": args.device,
        "precision": args.precision,
        "machine": machine(),
        "threads": args.threads or None,
        "seconds": round(time.perf_counter() - t0, 1),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "headline": {"model": top_model, "layout": "h2", "scans": head_scans, "kernel": "fused"},
        "throughput_ratio": top["speedup"] if top else None,
        "bound": top["bound"] if top else bound(head_spec or sweep_spec, "h2", head_scans),
        "memory_ratio": top["memory_ratio"] if top else None,
        "memory_ratio_math": math_top["memory_ratio"] if math_top else None,
        "memory_ratio_math_model": sweep_spec.name if math_top else None,
        "h2_fused_vs_full_math": cross,
        "goals": {
            "speedup_of_bound_min": min((r["of_bound"] for r in ok), default=None),
            "speedup_at_least_90pct_of_bound": all(r["of_bound"] >= 0.9 for r in ok) if ok else None,
            "memory_never_above_full": all((r.get("memory_ratio") or 0) <= 1.0 for r in ok) if ok else None,
            "math_memory_at_most_half": (math_top["memory_ratio"] <= 0.5) if math_top else None,
        },
        "models": {s.name: asdict(s) | {"tokens_per_scan": s.tokens_per_scan}
                   for s in (sweep_spec, head_spec) if s is not None},
        "rows": all_rows,
        "patch_dropout": pd_rows,
    }

    print(f"\n{args.device}, {args.precision}, torch threads {args.threads or 'default'}; forward+backward of the "
          "vision tower, batch 1 study; fused = flash/memory-efficient SDPA, math = non-fused SDPA\n")
    for label, group in ((sweep_spec, rows), (head_spec, head_rows)):
        if label is None:
            continue
        for kernel in args.kernels:
            sel = [r for r in group if r["kernel"] == kernel]
            if sel:
                print(f"{label.describe()} | {kernel} kernel\n")
                print(table(sel, SWEEP_COLUMNS) + "\n")
    if pd_rows:
        print(f"patch dropout ({sweep_spec.name}, h2, {head_scans} scans, fused kernel)\n")
        print(table(pd_rows, [("patch_dropout", "drop ratio", ".2f"), ("studies_per_s", "studies/s", ".3f"),
                              ("speedup", "speed-up", ".2f"), ("bound", "bound", ".2f"),
                              ("of_bound", "of bound", ".0%"), ("error", "note", "")]) + "\n")
    fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    print(f"headline ({top_model}, h2, {head_scans} scans, fused): throughput_ratio {fmt(result['throughput_ratio'])}, "
          f"bound {fmt(result['bound'])}, memory_ratio {fmt(result['memory_ratio'])}; math kernel memory_ratio "
          f"({sweep_spec.name}) {fmt(result['memory_ratio_math'])}")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
