"""Studies per second of a whole training step on CPUs: today's settings against the new defaults.

A whole step is what a site's round runs per optimiser step (:func:`hlip_fed.training.train.train_steps`):
the next batch from the site's DataLoader (the on-site tensor cache warm, augmentation as the
preset sets it), the report features (the locked text encoder's cache, warm), forward, backward,
gradient clipping and AdamW. One site of a consortium is built once per variant in one process,
and the variants run in rotating order, block after block, so that a change of machine load hits
every variant alike; a variant's figure is the median step time over its blocks.

Variants, for each preset (``demo``: the tiny HLIP of ``make demo``; ``learning``: the recipe of
``simulations.compare``), all with the preset's batch size raised to ``--batch``:

* ``baseline``: the settings before this benchmark existed: fp32, eager, the patch embedding
  as a 3D convolution, the patch embedding and scan and slice blocks over padded scans too, AdamW
  with its for-each kernels, no DataLoader worker, every scan read from its on-site cache file;
* the levers added one after another: ``+ linear patch embedding`` (the same weights applied as
  one linear layer over the cut patches), ``+ skip padded scans``, ``+ fused AdamW``, ``+ scans
  kept in memory`` (``data.memory_cache_mb``), ``+ bf16 autocast`` (a window's attention as bf16
  products);
* ``defaults``: the preset as it is configured now, in the precision ``train.precision: auto``
  resolves to on this machine; ``defaults + Conv3d patch embedding`` (the one lever whose sign
  differs between CPUs, measured with all the others); the defaults in the other precision
  ``auto`` chooses between: ``defaults in fp32`` on a CPU with bf16 instructions, ``defaults +
  bf16-held tower`` elsewhere (the vision tower's weights and activations in bf16, fp32 master
  weights), its training-loss curve measured beside the defaults'; and the defaults
  plus each lever they leave off: a DataLoader worker process prefetching batches, and
  ``torch.compile`` of the vision tower (its compile time reported apart; skipped with
  ``--quick``; in fp32 where the defaults hold the tower in bf16, whose per-step copy of a
  compiled tower does not train). These two start processes that outlive their steps (the
  worker, inductor's compile workers) and slow every other variant of the process, so each runs
  after the others have been measured, alone, and is shut down after.

Also measured in the same run: the GEMM peak (a 2048 x 2048 ``torch.mm``, fp32 and bf16), the model
FLOPs of the vision step counted analytically (:func:`benchmarks.attention.forward_macs`; torch's
FLOP counter skips CPU attention), the vision step alone (forward + backward on a batch held in
memory) for ``roofline_fraction`` (its FLOP/s over the peak of the precision it trains in), and a
profile of where a step's time goes, by operation (torch.profiler, self time): data, text side,
patch embedding (cutting and products), attention (QKV, the kernel or the window's products and
softmax, output projection), MLP, norms, token regrouping and copies, loss and projections,
optimiser (clipping included), other.

    python -m benchmarks.throughput --data data/demo --json throughput.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import os
import statistics
import tempfile
import time
import types
from dataclasses import dataclass, field, replace
from pathlib import Path

from benchmarks.attention import ModelSpec, forward_macs
from benchmarks.common import machine, table, write_json

CATEGORIES = ("data", "text side", "patch embedding", "attention", "MLP", "norms", "regrouping and copies",
              "loss and projections", "optimiser", "other")


@dataclass
class Variant:
    name: str
    precision: str = "fp32"
    conv_patch_embed: bool = True
    skip_padded: bool = False
    fused: bool = False
    workers: int = 0
    memory_cache_mb: int = 0
    compile: bool = False
    step_seconds: list[float] = field(default_factory=list)
    data_seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    compile_seconds: float | None = None


def derive(v: Variant, **change) -> Variant:
    """A copy of ``v``'s settings with ``change``, and no measurements."""
    return replace(v, step_seconds=[], data_seconds=[], losses=[], compile_seconds=None, **change)


def variants(defaults, quick: bool) -> tuple[list[Variant], list[Variant]]:
    """The baseline, the levers added one after another, the defaults and the defaults with the
    Conv3d patch embedding; and apart, the defaults plus each lever they leave off that starts
    processes (a worker process, compilation)."""
    steps = [Variant("baseline")]
    for name, change in (("+ linear patch embedding", {"conv_patch_embed": False}),
                         ("+ skip padded scans", {"skip_padded": True}),
                         ("+ fused AdamW", {"fused": True}),
                         ("+ scans kept in memory", {"memory_cache_mb": 1024}),
                         ("+ bf16 autocast", {"precision": "bf16"})):
        steps.append(derive(steps[-1], name=name, **change))
    from hlip_fed.training.train import training_precision

    kept = Variant("defaults", precision=training_precision(defaults), conv_patch_embed=False, skip_padded=True,
                   fused=defaults.train.fused_optimizer, workers=defaults.data.num_workers,
                   memory_cache_mb=defaults.data.memory_cache_mb)
    extra = [derive(kept, name="defaults + DataLoader worker", workers=1)] if kept.workers == 0 else []
    if not quick:  # the held tower is a bf16 copy of model.visual, and a compiled module's copy
        # is no compiled bf16 tower (the learning preset's loss was NaN at its second step)
        extra.append(derive(kept, name="defaults + torch.compile", compile=True) if kept.precision != "bf16-held"
                     else derive(kept, name="defaults in fp32 + torch.compile", compile=True, precision="fp32"))
    return steps + [kept, derive(kept, name="defaults + Conv3d patch embedding", conv_patch_embed=True),
                    other_precision(kept)], extra


def other_precision(kept: Variant) -> Variant:
    """The defaults in the other precision ``train.precision: auto`` chooses between on a CPU."""
    if kept.precision == "bf16-held":
        return derive(kept, name="defaults in fp32", precision="fp32")
    return derive(kept, name="defaults + bf16-held tower", precision="bf16-held")


def former_forwards(visual, conv_patch_embed: bool, skip_padded: bool) -> None:
    """Put back the vision tower's former forward pieces: the patch embedding as one Conv3d over
    every scan, and the patch embedding and the scan and slice blocks over the padded scans too."""
    import torch.nn.functional as F

    def conv_forward(self, x, scan_mask=None):
        b, n = x.shape[:2]
        x = x.flatten(0, 1).to(self.proj.weight.dtype)
        y = F.conv3d(x, self.proj.weight, self.proj.bias, stride=self.patch_size)
        c, gd, gh, gw = y.shape[1:]
        return y.permute(0, 2, 3, 4, 1).reshape(b, n, gd, gh * gw, c)

    if conv_patch_embed:
        visual.patch_embed.forward = types.MethodType(conv_forward, visual.patch_embed)
    elif not skip_padded:
        visual.patch_embed.forward = types.MethodType(lambda self, x, scan_mask=None: self.tokens(x, None),
                                                      visual.patch_embed)
    if not skip_padded:
        visual._real_windows = lambda x, *_: (x, None)


def step_flops(spec: ModelSpec, levels: list[str], scans_per_study: list[int]) -> float:
    """FLOPs of the vision tower's forward + backward over one batch, as the defaults compute it:
    the patch embedding and study blocks over every scan slot of the batch (padded ones included),
    scan and slice blocks over the real scans only. 2 FLOPs per multiply-add; backward twice the
    forward, except the patch embedding's, whose input needs no gradient (once)."""
    n = max(scans_per_study)
    patch = forward_macs(spec, [], n)
    total = 0.0
    for real in scans_per_study:
        blocks = sum(forward_macs(spec, [lv], n if lv == "study" else real) - forward_macs(spec, [], n if lv == "study" else real)
                     for lv in levels)
        total += 3 * blocks + 2 * patch
    return 2.0 * total


def gemm_peak(dtype, seconds: float = 1.5) -> float:
    """FLOP/s of a 2048 x 2048 ``torch.mm`` (median of repeated products)."""
    import torch

    a, b = torch.randn(2048, 2048).to(dtype), torch.randn(2048, 2048).to(dtype)
    torch.mm(a, b)
    times, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 3:
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * 2048**3 / statistics.median(times)


class Site:
    """One variant's site: model, data, optimiser and an endless batch iterator, built once."""

    def __init__(self, cfg, variant: Variant, data_dir: Path, state_dir: Path):
        import torch
        from torch.utils.data import DataLoader

        from hlip_fed.data.dataset import collate_studies
        from hlip_fed.federation.local import LocalSite
        from hlip_fed.federation.run import Site as SiteSpec
        from hlip_fed.training.train import cycle, make_optimizer, scan_dtype

        cfg.train.precision = variant.precision
        cfg.train.fused_optimizer = variant.fused
        cfg.data.memory_cache_mb = variant.memory_cache_mb
        self.cfg, self.variant = cfg, variant
        self.local = LocalSite(cfg, SiteSpec(data_dir.name, data_dir, state_dir, None))
        self.model = self.local.model
        former_forwards(self.model.visual, variant.conv_patch_embed, variant.skip_padded)
        if variant.compile:
            self.model.visual = torch.compile(self.model.visual)
        self.optimizer = make_optimizer(self.model, cfg.train)
        gen = torch.Generator().manual_seed(cfg.train.seed)
        self.loader = DataLoader(self.local.train_set, batch_size=cfg.train.batch_size, shuffle=True, generator=gen,
                                 collate_fn=functools.partial(collate_studies, dtype=scan_dtype(cfg)),
                                 num_workers=variant.workers, drop_last=True,
                                 persistent_workers=variant.workers > 0)
        self.batches = cycle(self.loader, cfg.train.seed)
        self.step = 0

    def settle(self) -> None:
        """Stop inductor's compile workers once the warm-up has compiled the tower: left running,
        they take CPU from the steps (a shape not seen yet starts them again)."""
        if self.variant.compile:
            from torch._inductor.async_compile import shutdown_compile_workers

            shutdown_compile_workers()

    def close(self) -> None:
        """Stop what outlives a step: the DataLoader's worker processes, inductor's compile workers."""
        self.batches.close()
        del self.batches, self.loader  # the loader owns the persistent workers: collected, they stop
        gc.collect()
        self.settle()

    def timed_batches(self):
        import torch

        while True:
            t0 = time.perf_counter()
            with torch.profiler.record_function("data"):
                batch = next(self.batches)
            self.variant.data_seconds.append(time.perf_counter() - t0)
            yield batch

    def run(self, steps: int, record: bool = True) -> None:
        from hlip_fed.training.train import train_steps

        marks = [time.perf_counter()]
        stats = train_steps(self.model, self.local.tokenizer, self.timed_batches(), self.cfg.train, steps,
                            optimizer=self.optimizer, start_step=self.step, total_steps=10**6,
                            on_step=lambda *_: marks.append(time.perf_counter()), text_cache=TextSide(self.local.text_cache))
        self.step += steps
        if record:
            self.variant.step_seconds += [b - a for a, b in zip(marks, marks[1:])]
            self.variant.losses += stats.losses
        else:
            del self.variant.data_seconds[-steps:]


class TextSide:
    """The site's text-feature cache, its lookups labelled for the profile."""

    def __init__(self, cache):
        self.cache = cache

    def features(self, reports, encode):
        import torch

        with torch.profiler.record_function("text side"):
            return self.cache.features(reports, encode)


def classify(event, spec: ModelSpec) -> str:
    """The category of a profiled operation, from its outermost labelled range, name and shapes."""
    root = event
    while root.cpu_parent is not None:
        root = root.cpu_parent
    if root.name in ("data", "text side"):
        return root.name
    if root.name.startswith("Optimizer.") or "foreach" in event.name or "clip_grad" in root.name:
        return "optimiser"
    name = event.name
    dims = {d for shape in (event.input_shapes or []) for d in (shape or [])}
    voxels = spec.patch_size[0] * spec.patch_size[1] * spec.patch_size[2]
    cutting = name == "aten::copy_" and any(len(s or ()) >= 6 for s in event.input_shapes)  # a patch view's copy
    if "conv" in name or voxels in dims or cutting:
        return "patch embedding"
    if "attention" in name or name in ("aten::bmm", "aten::_softmax", "aten::_softmax_backward_data"):
        return "attention"  # the kernel, or a window's two batched products and softmax
    if name in ("aten::mm", "aten::addmm", "aten::linear"):
        hidden = int(spec.width * spec.mlp_ratio)
        if hidden in dims and spec.width in dims:
            return "MLP"
        if 3 * spec.width in dims or dims <= {spec.width} | {d for d in dims if d > 4 * spec.width}:
            return "attention"
        return "loss and projections"
    if "gelu" in name:
        return "MLP"
    if "layer_norm" in name:
        return "norms"
    if name in ("aten::copy_", "aten::cat", "aten::clone", "aten::contiguous", "aten::gather",
                "aten::repeat_interleave", "aten::index_select", "aten::_to_copy", "aten::cat_backward"):
        return "regrouping and copies"
    if any(k in name for k in ("log_softmax", "nll_loss", "cross_entropy", "normalize", "norm", "exp")):
        return "loss and projections"
    return "other"


def profile(site: Site, steps: int, spec: ModelSpec) -> dict[str, float]:
    """Self CPU seconds per step and category over ``steps`` profiled steps."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        site.run(steps, record=False)
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    for event in prof.events():
        seconds[classify(event, spec)] += event.self_cpu_time_total / 1e6
    return {k: v / steps for k, v in seconds.items()}


def vision_step_seconds(site: Site, repeats: int) -> tuple[float, list[int]]:
    """Median time of the vision tower's forward + backward on one batch held in memory."""
    import torch

    from hlip_fed.training.bf16_tower import Bf16Tower
    from hlip_fed.training.train import autocast

    images, mask, _, _ = next(site.batches)
    held = Bf16Tower(site.model) if site.variant.precision == "bf16-held" else None
    site.model.visual.train()
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        with held.step() if held else contextlib.nullcontext(), autocast(site.cfg.train):
            out = site.model.visual(images, mask)
            out.float().sum().backward()
        if i:
            times.append(time.perf_counter() - t0)
    site.model.zero_grad(set_to_none=True)
    return statistics.median(times), mask.sum(1).tolist()


def loss_curve(preset: str, overrides: list[str], variant: Variant, seed: int, steps: int, data_dir: Path,
               state_dir: Path) -> list[float]:
    """Training losses of ``steps`` steps of one site from the seed's initialisation and batches."""
    import torch

    from hlip_fed.config import load_config
    from hlip_fed.training.train import train_steps

    site = Site(load_config(files=[preset], overrides=[*overrides, f"train.seed={seed}",
                                                        f"train.warmup_steps={max(1, steps // 10)}"]),
                variant, data_dir, state_dir)
    torch.manual_seed(seed)
    return train_steps(site.model, site.local.tokenizer, site.batches, site.cfg.train, steps,
                       optimizer=site.optimizer, text_cache=site.local.text_cache).losses


def compare_curves(curves: dict[str, list[list[float]]], tail: int) -> dict:
    """Mean loss of the last ``tail`` steps per seed; each variant's shift from the baseline against
    the seed-to-seed spread (``shift``, ``within_seed_noise``: the defaults')."""
    finals = {name: [statistics.fmean(c[-tail:]) for c in runs] for name, runs in curves.items()}
    shifts = {name: statistics.fmean(f) - statistics.fmean(finals["baseline"]) for name, f in finals.items()
              if name != "baseline"}
    spread = statistics.stdev(finals["baseline"]) if len(finals["baseline"]) > 1 else float("nan")
    return {"final_loss": finals, "shifts": shifts, "shift": shifts["defaults"], "seed_sd": spread,
            "within_seed_noise": bool(abs(shifts["defaults"]) <= 2 * spread)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="consortium folder (hlip-fed synth)")
    ap.add_argument("--site", type=int, default=0, help="index of the site in sites/")
    ap.add_argument("--presets", nargs="+", default=["demo", "learning"])
    ap.add_argument("--batch", type=int, default=8, help="studies per step")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per block")
    ap.add_argument("--blocks", type=int, default=4, help="blocks per variant, in rotating order")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--curve-steps", type=int, default=80, help="steps of each training-loss curve (0: none)")
    ap.add_argument("--curve-seeds", type=int, default=3, help="seeds of the curves, baseline and defaults each")
    ap.add_argument("--overrides", nargs="*", default=[])
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 blocks of 2 steps, no compile (a smoke test)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from hlip_fed.config import load_config
    from hlip_fed.federation.run import consortium_sites

    torch.set_num_threads(args.threads)
    overrides = [f"train.batch_size={args.batch}", *args.overrides]
    if args.quick:
        overrides = ["model.text.pretrained=false", "model.text.overrides={hidden_size: 32, num_hidden_layers: 1, "
                     "num_attention_heads: 2, intermediate_size: 64}", "model.vision.img_size=[16, 32, 32]",
                     "model.embed_dim=32", *overrides]
        args.steps, args.blocks, args.curve_steps, args.curve_seeds = 2, 2, 4, 2
    data_dir = consortium_sites(args.data)[args.site]
    peak = {"fp32": gemm_peak(torch.float32), "bf16": gemm_peak(torch.bfloat16)}
    print(f"GEMM peak (2048 x 2048 mm, {args.threads} threads): fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s", flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="hlip-throughput-") as tmp:
        for preset in args.presets:
            defaults = load_config(files=[preset], overrides=overrides)
            spec = ModelSpec.of(defaults.model.preset, defaults.model.vision)
            runs, extra = variants(defaults, args.quick)

            def build(v: Variant) -> Site:
                t0 = time.perf_counter()
                site = Site(load_config(files=[preset], overrides=overrides), v, data_dir, Path(tmp) / preset / "state")
                site.run(2, record=False)  # warm: tensor and text caches, allocator, compilation
                if v.compile:
                    v.compile_seconds = time.perf_counter() - t0
                return site

            sites = {v.name: build(v) for v in runs}
            for block in range(args.blocks):
                order = runs[block % len(runs):] + runs[: block % len(runs)]
                for v in order:
                    sites[v.name].run(args.steps)
                print(f"{preset}: block {block + 1}/{args.blocks}", flush=True)
            base, new = sites["baseline"], sites["defaults"]
            prof = {"baseline": profile(base, args.steps, spec), "defaults": profile(new, args.steps, spec)}
            vision_s, scans = vision_step_seconds(new, args.steps)
            for v in extra:  # alone, after everything else of this preset, and shut down after
                site = build(v)
                site.settle()
                site.run(args.steps, record=False)
                for block in range(args.blocks):
                    site.run(args.steps)
                site.close()
                print(f"{preset}: {v.name} measured", flush=True)
            rows = []
            for v in runs + extra:
                step = statistics.median(v.step_seconds)
                rows.append({"variant": v.name, "precision": v.precision, "step_ms": 1000 * step,
                             "data_ms": 1000 * statistics.median(v.data_seconds),
                             "studies_per_s": args.batch / step, "compile_s": v.compile_seconds,
                             "loss_first": v.losses[0], "loss_last": v.losses[-1]})
            for r in rows:
                r["speedup"] = r["studies_per_s"] / rows[0]["studies_per_s"]
            flops = step_flops(spec, new.model.visual.levels, scans)
            achieved = flops / vision_s
            precision = {"bf16-held": "bf16"}.get(new.variant.precision, new.variant.precision)
            precision = precision if precision in peak else "fp32"
            results[preset] = {
                "rows": rows,
                "speedup": next(r["speedup"] for r in rows if r["variant"] == "defaults"),
                "profile_seconds_per_step": prof,
                "vision_step": {"seconds": vision_s, "scans_per_study": scans, "flops": flops,
                                "flop_per_s": achieved, "precision": precision},
                "roofline_fraction": achieved / peak[precision],
            }
            print(f"\n### {preset} (batch {args.batch}, {args.threads} threads)\n")
            print(table(rows, [("variant", "variant", ""), ("precision", "precision", ""), ("step_ms", "step ms", ".1f"),
                               ("data_ms", "of it data ms", ".1f"), ("studies_per_s", "studies/s", ".1f"),
                               ("speedup", "vs baseline", ".2f"), ("compile_s", "compile s", ".0f"),
                               ("loss_last", "last loss", ".3f")]))
            print()
            print(table([{"category": c, "baseline": 1000 * prof["baseline"][c], "defaults": 1000 * prof["defaults"][c]}
                         for c in CATEGORIES],
                        [("category", "where a step goes (profiled self time)", ""), ("baseline", "baseline ms", ".1f"),
                         ("defaults", "defaults ms", ".1f")]))
            if args.curve_steps:
                curves = {v.name: [loss_curve(preset, overrides, derive(v),
                                              seed, args.curve_steps, data_dir, Path(tmp) / preset / "state")
                                   for seed in range(args.curve_seeds)]
                          for v in (runs[0], new.variant, sites[other_precision(new.variant).name].variant)}
                results[preset]["loss_curves"] = {"steps": args.curve_steps, "curves": curves,
                                                  **compare_curves(curves, max(1, args.curve_steps // 8))}
                c = results[preset]["loss_curves"]
                print(f"\ntraining loss after {args.curve_steps} steps, {args.curve_seeds} seeds (seed sd "
                      f"{c['seed_sd']:.3f}): " + "; ".join(
                          f"{name} " + ", ".join(f"{x:.3f}" for x in finals)
                          + (f" (shift {c['shifts'][name]:+.3f})" if name in c["shifts"] else "")
                          for name, finals in c["final_loss"].items()))
            print(f"\nvision step alone: {1000 * vision_s:.1f} ms for {flops / 1e9:.1f} GFLOP -> "
                  f"{achieved / 1e9:.1f} GFLOP/s = {100 * results[preset]['roofline_fraction']:.0f} % of the "
                  f"{precision} GEMM peak; whole step speedup {results[preset]['speedup']:.2f}x", flush=True)
    first = results[args.presets[0]]
    write_json(args.json, {"machine": machine(), "threads": args.threads, "batch": args.batch, "overrides": overrides,
                           "site": data_dir.name, "gemm_peak_flop_per_s": peak, "presets": results,
                           "speedup": first["speedup"], "roofline_fraction": first["roofline_fraction"]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
