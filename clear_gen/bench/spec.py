"""What `clear-gen bench` is asked (`BenchOptions`, as given: flags or a library call's keywords) and what
it will measure (`BenchSpec`), parsed once by `parse_bench`: every name and number checked, the window and
down factor resolved (a variant, a window, or the registry's default variant), before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..errors import ConfigError

WHATS = ("plan", "attention", "check", "step", "image", "env")
MEASURES = ("both", "clear", "full", "composed")
IMAGE_ONLY = ("stages", "steps", "vae_channels", "cache", "vae_tiling")  # --what image's options
SPEED = ("compile", "quantize")  # --what image's and a step's


@dataclass(frozen=True)
class BenchOptions:
    """Everything `clear-gen bench` takes, as given; None: the default."""

    what: str = "plan"  # plan | attention | check | step | image | env
    res: tuple[int, ...] | None = None  # sides in px; None: 1K-8K (1K alone for measurements on a CPU)
    variant: str | None = None  # a registry variant: sets the window and down factor
    window: int | None = None  # instead of a variant
    down_factor: int | None = None  # with --window (1), or over the default variant's
    heads: int | None = None  # the model's shape: FLUX.1-dev's (24 x 128), 2 x 64 for a measurement on a CPU
    head_dim: int | None = None
    layers: int = 57  # blocks, 1 : 2 double : single
    text_len: int = 512
    device: str = "auto"
    dtype: str | None = None
    backend: str = "auto"  # CLEAR's kernel; attention: several, comma-separated, measured side by side
    repeats: int = 3  # timed calls after a warm-up (median)
    compare_full: bool = True  # full attention / the stock model too
    measure: str = "both"  # step: both, clear, full, or composed (full from timed attention ops)
    max_full_seconds: float | None = None  # estimate, not run, full-attention calls slower than this
    time_budget: float | None = None  # estimate full attention that would end later than this from now
    gpus: tuple[int, ...] = ()  # plan: head-parallel traffic at these GPU counts
    stages: tuple[int, ...] | None = None  # image: long side of each stage, as generate's
    steps: int | None = None  # image: every stage's steps (20)
    vae_channels: int | None = None  # image: the VAE's width (128, FLUX.1's; 8 on a CPU)
    compile: bool | None = None  # image, step: compile the transformer blocks
    cache: str | None = None  # image: step caching
    quantize: str | None = None  # image, step: the transformer's weights
    vae_tiling: str | None = None  # image: auto | exact | fast | off, as generate's (auto)


@dataclass(frozen=True)
class BenchSpec:
    """A benchmark, checked: what every measurement reads (the asked options beside the decided ones)."""

    asked: BenchOptions
    window: int  # decided: the variant's, the given one or the default variant's
    down_factor: int
    heads: int  # decided: the given ones, else FLUX.1-dev's, or the CPU's (CPU_SHAPE) for a measurement there
    head_dim: int
    vae_channels: int  # --what image's VAE width
    image: dict = field(default_factory=dict)  # --what image's options that were given
    compile: bool = False  # decided: compile the blocks (image, step)
    quantize: str = "none"  # decided: the transformer's weights (image, step; a mode this device runs)
    backends: tuple[str, ...] = ("auto",)  # decided: each a backend name or auto


def parse_bench(opts: BenchOptions) -> BenchSpec:
    """`opts` checked and its attention resolved, before anything is built; one ConfigError otherwise."""
    if opts.what not in WHATS:
        raise ConfigError(f"unknown benchmark {opts.what!r}; choose one of {', '.join(WHATS)}")
    if opts.measure not in MEASURES:
        raise ConfigError(f"unknown measure {opts.measure!r}; choose one of {', '.join(MEASURES)}")
    if opts.repeats < 0 or min(opts.heads or 1, opts.head_dim or 1) < 1:
        raise ConfigError("heads and head dim must be positive, repeats >= 0")
    if opts.gpus and (opts.what != "plan" or min(opts.gpus) < 1):
        raise ConfigError("--gpus takes GPU counts of 1 or more, with --what plan (torchrun runs the step)")
    if opts.res is not None and not opts.res:
        raise ConfigError("no resolution given")
    given = {name: getattr(opts, name) for name in (*IMAGE_ONLY, *SPEED) if getattr(opts, name) is not None}
    for name in given:
        if opts.what != "image" and (name in IMAGE_ONLY or opts.what != "step"):
            whats = "image only" if name in IMAGE_ONLY else "image or step"
            raise ConfigError(f"--{name.replace('_', '-')} is an option of --what {whats}")
    quantize = _quantize(opts)
    _check_step(opts, quantize)
    window, down_factor = _attention(opts)
    heads, head_dim, vae_channels = _shape(opts)
    image = given if opts.what == "image" else {}
    backends = _backends(opts)
    return BenchSpec(
        opts,
        window,
        down_factor,
        heads,
        head_dim,
        vae_channels,
        image,
        bool(opts.compile),
        quantize,
        backends,
    )


def _quantize(opts: BenchOptions) -> str:
    """--quantize: a mode quantize_built applies to random weights (nf4 quantizes only while loading) and
    this device runs."""
    from ..core.device import resolve_device
    from ..weights import quantize as Q

    mode = opts.quantize or "none"
    if mode == "none":
        return mode
    Q.check_names(mode, "none", None)
    Q.check_built(mode)
    Q.check_device(mode, "none", resolve_device(opts.device))
    return mode


def _check_step(opts: BenchOptions, quantize: str) -> None:
    """A step's --compile / --quantize time one size (the model changes in place after its plain step);
    --measure composed times one GPU's step, not torchrun's."""
    from ..core.launch import launched

    if opts.what != "step":
        return
    if (opts.compile or quantize != "none") and (opts.res is None or len(opts.res) != 1):
        raise ConfigError("--compile and --quantize time one step size: give one --res")
    if opts.measure == "composed" and launched():
        raise ConfigError("--measure composed times one GPU's step; run it without torchrun")


def _backends(opts: BenchOptions) -> tuple[str, ...]:
    """--backend: one name (or auto), or for --what attention several, compared side by side."""
    from ..attention.backends import check_backend

    names = tuple(dict.fromkeys(name.strip() for name in opts.backend.split(",")))
    for name in names:
        check_backend(name)
    if len(names) > 1 and opts.what != "attention":
        raise ConfigError(
            f"--backend {opts.backend}: several backends side by side with --what attention only"
        )
    return names


GPU_SHAPE = (24, 128, 128)  # heads, head dim, VAE channels: FLUX.1-dev's
CPU_SHAPE = (2, 64, 8)  # a measurement on a CPU: seconds, not hours


def _shape(opts: BenchOptions) -> tuple[int, int, int]:
    """(heads, head dim, VAE channels): the given ones, else FLUX.1-dev's, or CPU_SHAPE's when the run
    measures on a CPU (a plan measures nothing: FLUX.1-dev's)."""
    from ..core.device import resolve_device

    on_cpu = opts.what != "plan" and resolve_device(opts.device).type == "cpu"
    default = CPU_SHAPE if on_cpu else GPU_SHAPE
    given = (opts.heads, opts.head_dim, opts.vae_channels)
    return tuple(d if g is None else g for g, d in zip(given, default, strict=True))


def _attention(opts: BenchOptions) -> tuple[int, int]:
    """(window, down factor): a variant's, a given window's, or the default variant's (its down factor
    replaced by a given one)."""
    from ..attention import check_window
    from ..plan.parse import clear_choice
    from ..weights.registry import load_registry

    if opts.variant is not None:
        choice = clear_choice(opts.variant, opts.window, opts.down_factor)  # a conflict is refused here
        if choice.window is None:
            raise ConfigError("bench measures CLEAR: give a CLEAR variant, not none")
        return choice.window, choice.down_factor
    check_window(opts.window, opts.down_factor, flags=True)
    if opts.window is not None:
        return opts.window, opts.down_factor or 1
    registry = load_registry()
    default = registry.variant(registry.default_variant)
    return default.window, default.down_factor if opts.down_factor is None else opts.down_factor


def bench_options(what: str = "plan", **given) -> BenchOptions:
    """BenchOptions from keywords (the library's `bench.run(what, res=[...], ...)`); unknown names refused."""
    names = {f.name for f in fields(BenchOptions)}
    given = {k: v for k, v in given.items() if v is not None}
    unknown = sorted(given.keys() - names)
    if unknown:
        raise ConfigError(f"unknown bench option {unknown[0]!r}; valid: {', '.join(sorted(names))}")
    sequences = {k: tuple(v) for k, v in given.items() if k in ("res", "gpus", "stages")}
    return BenchOptions(what=what, **{**given, **sequences})
