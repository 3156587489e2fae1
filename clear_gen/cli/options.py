"""The options `generate`, `upscale` and `compare` share, declared once as signature-only groups that
`with_options` appends to a command, and their values parsed into GenerateOptions (`generate_options`);
with the small parsers the other commands use too (comma-separated numbers, on/off/auto).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from ..errors import ConfigError
from ..files.record import record_from_image
from ..files.text import prompt_lines
from ..plan.recipe import RECIPES
from ..plan.spec import GenerateOptions


def ints(text: str | None, name: str, what: str = "pixel sizes, e.g. 1024,2048,4096") -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ConfigError(f"{name} takes comma-separated {what}; got {text!r}") from None


def dimensions(res: int | None, width: int | None, height: int | None) -> tuple[int | None, int | None]:
    if res is not None and (width is not None or height is not None):
        raise ConfigError("give either --res or --width/--height, not both")
    if res is not None:
        return res, res
    if (width is None) != (height is None):
        return (width or height), (height or width)
    return width, height


def prompt_list(prompt: str | None, prompts_file: Path | None) -> list[str]:
    """PROMPT, then every prompt of --prompts-file (both together: PROMPT comes first)."""
    if prompts_file is None:
        return [prompt] if prompt is not None else []
    from_file = prompt_lines(prompts_file, f"--prompts-file {prompts_file}")
    return ([prompt] if prompt else []) + from_file


def on_off(value: str, name: str) -> bool | None:
    """on -> True, off -> False, auto -> None (the recipe decides)."""
    choices = {"on": True, "off": False, "auto": None}
    if value.lower() not in choices:
        raise ConfigError(f"{name} takes on, off or auto; got {value!r}")
    return choices[value.lower()]


# --help panels: generate's, then bench's (with RUN and OUTPUT)
SIZE, MODEL, RECIPE, PROMPTS = "Size", "Model and attention", "Recipe", "Prompts"
OUTPUT, RUN, WHAT, SHAPE, SPEED = "Output", "Run", "What", "Model shape", "Speed"
CONTROL = "ControlNet"
DEFAULTS = GenerateOptions(prompts=[])  # the defaults shown in --help are the ones a run uses
RECIPE_DEFAULTS = RECIPES[DEFAULTS.recipe]


def size_options(
    res: int = typer.Option(
        None,
        help="Square side in px: a multiple of 16 (64 for -down4).",
        show_default=str(DEFAULTS.width),
        rich_help_panel=SIZE,
    ),
    width: int = typer.Option(
        None, help="Width in px (with --height; alone: a square).", rich_help_panel=SIZE
    ),
    height: int = typer.Option(
        None, help="Height in px (with --width; alone: a square).", rich_help_panel=SIZE
    ),
    stages: str = typer.Option(
        None,
        help="Long side of each stage, e.g. 1024,2048,4096.",
        show_default="1024,target",
        rich_help_panel=SIZE,
    ),
    upscale_from: int = typer.Option(
        None, help="One SDEdit stage from a first pass at this long side.", rich_help_panel=SIZE
    ),
    direct: bool = typer.Option(
        False, "--direct", help="No first pass: text-to-image at the target.", rich_help_panel=SIZE
    ),
) -> None:
    """Generate's size options, shared with compare (only its signature is used)."""


def model_options(
    model: str = typer.Option(
        None,
        help="Base (dev, schnell), Hub repo id or local folder.",
        show_default=DEFAULTS.model,
        rich_help_panel=MODEL,
    ),
    backend: str = typer.Option(
        None,
        help=(
            "CLEAR kernel: auto, flex, gather, flex-split (text rows apart), flex-fa4 (FlashAttention-4) "
            "or dense."
        ),
        show_default="auto",
        rich_help_panel=MODEL,
    ),
    transformer: str = typer.Option(
        None, help="FLUX.1 transformer .gguf: a file or owner/repo/file.gguf.", rich_help_panel=MODEL
    ),
    token: str = typer.Option(
        None, help="Hub token.", show_default="HF_TOKEN or hf auth login", rich_help_panel=MODEL
    ),
    lora: list[str] = typer.Option(
        None,
        help="LoRA PATH_OR_REPO[:SCALE] (file, owner/repo or owner/repo/file); repeatable.",
        rich_help_panel=MODEL,
    ),
    lora_file: list[str] = typer.Option(
        None, help="File of a --lora owner/repo holding several, in order; repeatable.", rich_help_panel=MODEL
    ),
) -> None:
    """The base, its transformer, LoRAs and the attention kernel (only its signature is used)."""


def sampling_options(
    steps: int = typer.Option(
        None, help="Steps of each CLEAR stage.", show_default=str(DEFAULTS.steps), rich_help_panel=RECIPE
    ),
    guidance: float = typer.Option(
        None, help="Guidance of the CLEAR stages.", show_default="7.5; 3.5 --direct", rich_help_panel=RECIPE
    ),
    first_steps: int = typer.Option(
        None,
        help="Steps of the first pass.",
        show_default=str(RECIPE_DEFAULTS.first_steps),
        rich_help_panel=RECIPE,
    ),
    first_guidance: float = typer.Option(
        None,
        help="Guidance of the first pass.",
        show_default=str(RECIPE_DEFAULTS.first_guidance),
        rich_help_panel=RECIPE,
    ),
    strength: float = typer.Option(
        None, help="SDEdit strength, in (0, 1].", show_default=str(DEFAULTS.strength), rich_help_panel=RECIPE
    ),
    ntk_factor: float = typer.Option(
        None, help="RoPE NTK factor.", show_default="10 above 1024 px, else 1", rich_help_panel=RECIPE
    ),
    proportional_attention: str = typer.Option(
        "auto",
        help="Proportional attention: on, off or auto (on above 1024 px, off with --dype).",
        rich_help_panel=RECIPE,
    ),
    dype: bool = typer.Option(
        None,
        "--dype/--no-dype",
        help="DyPE: RoPE that follows each step's noise level in the CLEAR stages, instead of the NTK "
        "factor (patent pending for commercial use, per its authors).",
        show_default="off",
        rich_help_panel=RECIPE,
    ),
    max_sequence_length: int = typer.Option(
        None, help="T5 tokens, up to 512.", show_default="512; 256 schnell", rich_help_panel=RECIPE
    ),
) -> None:
    """The recipe's numbers: steps, guidance, strength, RoPE and scale (only its signature is used)."""


def guide_options(
    guide: str = typer.Option(
        None,
        help="Projected-flow guidance of CLEAR SDEdit stages: none, cosine-decay, constant or cosine-shift.",
        show_default="cosine-decay above 4096 px or beyond 2:1, else none",
        rich_help_panel=RECIPE,
    ),
    guide_level: int = typer.Option(
        None, help="Haar low-pass level L: 2^L x 2^L latent cells.", show_default="1", rich_help_panel=RECIPE
    ),
) -> None:
    """Projected-flow guidance towards each SDEdit stage's start picture (only its signature is used)."""


def run_options(
    device: str = typer.Option("auto", help="auto, cuda, cuda:N, mps or cpu.", rich_help_panel=RUN),
    dtype: str = typer.Option(
        None, help="bf16, fp16 or fp32.", show_default="bf16 CUDA/MPS, fp32 CPU", rich_help_panel=RUN
    ),
    offload: str = typer.Option(
        DEFAULTS.offload, help="auto (from the memory plan), none, model or sequential.", rich_help_panel=RUN
    ),
    gpu_memory: float = typer.Option(
        None,
        help="GB of GPU memory to plan for (on a GPU, the run keeps to it).",
        show_default="free memory; 24 without a GPU",
        rich_help_panel=RUN,
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the memory and time plan; load nothing.", rich_help_panel=RUN
    ),
    quantize: str = typer.Option(
        None,
        help="Transformer weights: none, fp8, fp8dq, int8 or nf4.",
        show_default="none",
        rich_help_panel=RUN,
    ),
    quantize_text: str = typer.Option(
        None, help="T5 weights: none, int8, fp8 or nf4.", show_default="none", rich_help_panel=RUN
    ),
) -> None:
    """Where and how a run computes: device, dtype, memory, quantization (only its signature is used)."""


def speed_options(
    compile: bool = typer.Option(
        None,
        "--compile/--no-compile",
        help="Compile the transformer blocks.",
        show_default="off",
        rich_help_panel=SPEED,
    ),
    cache: str = typer.Option(
        None,
        help="Step caching: none, fbc[:T] or taylorseer[:N] (changes the image).",
        show_default="none",
        rich_help_panel=SPEED,
    ),
    parallel: str = typer.Option(
        "auto",
        help="Under torchrun: sequence (each image over every GPU), data (images spread) or auto.",
        rich_help_panel=RUN,
    ),
) -> None:
    """Compilation, step caching and torchrun's mode (only its signature is used)."""


def vae_options(
    vae_tiling: str = typer.Option(
        None,
        help="VAE tiles: exact (equal to untiled), fast (diffusers', seams), off, or auto (exact above "
        "2048 px).",
        show_default=DEFAULTS.vae_tiling,
        rich_help_panel=RUN,
    ),
    vae_tile: int = typer.Option(
        None, help="VAE tile side in px.", show_default="1024, the VAE's sample size", rich_help_panel=RUN
    ),
) -> None:
    """How the VAE tiles its encodes and decodes (only its signature is used)."""


# What every command that generates takes besides its size, attention, ControlNet and output options.
recipe_options = (model_options, sampling_options, guide_options, run_options, speed_options, vae_options)


def attention_options(
    variant: str = typer.Option(
        None,
        help="CLEAR weights (clear-gen weights); none = full attention.",
        show_default="r8-down4; none <= 1024 px",
        rich_help_panel=MODEL,
    ),
    window: int = typer.Option(
        None, help="Custom CLEAR window r (instead of --variant).", rich_help_panel=MODEL
    ),
    down_factor: int = typer.Option(
        None, help="Custom down factor f (with --window).", rich_help_panel=MODEL
    ),
    clear_weights: Path = typer.Option(
        None, help="Custom .safetensors (with --window); none: training-free.", rich_help_panel=MODEL
    ),
) -> None:
    """Which attention: a variant, or a custom window (generate and upscale; only its signature is used)."""


def control_options(
    controlnet: str = typer.Option(
        None,
        help="A FLUX.1 ControlNet: registry name (clear-gen weights), Hub repo or folder.",
        rich_help_panel=CONTROL,
    ),
    control: Path = typer.Option(
        None,
        help="Its control picture (edge map, depth map, photo).",
        show_default="upscale: the picture itself",
        rich_help_panel=CONTROL,
    ),
    control_mode: str = typer.Option(
        None,
        help="A union ControlNet's mode: canny, tile, depth, blur, pose, gray, lq (or its number).",
        rich_help_panel=CONTROL,
    ),
    control_scale: float = typer.Option(
        None,
        help="How strongly the control picture steers, >= 0.",
        show_default="the registry's, else 1",
        rich_help_panel=CONTROL,
    ),
) -> None:
    """The ControlNet options of generate, upscale and compare (only its signature is used)."""


# Passed on even when None: with --from, these do not come from the image's record (dtype and backend
# do: the record says what made the image).
ALWAYS = {"keep_stages", "out", "device", "offload", "compare_full", "token"}


def output_options(
    out: str = typer.Option(
        None,
        "--out",
        "-o",
        help="Output file or folder.",
        show_default="current folder",
        rich_help_panel=OUTPUT,
    ),
    keep_stages: bool = typer.Option(
        False, "--keep-stages", help="Also save each stage's image.", rich_help_panel=OUTPUT
    ),
    as_json: bool = typer.Option(
        False, "--json", help="One JSON object per image on stdout.", rich_help_panel=OUTPUT
    ),
    no_compare_full: bool = typer.Option(
        False,
        "--no-compare-full",
        help="Skip timing full attention at each CLEAR size.",
        rich_help_panel=OUTPUT,
    ),
) -> None:
    """Where images go and what is printed: generate's and upscale's (only its signature is used)."""


def with_options(*groups: Callable | tuple[Callable, ...], shown: dict[str, str] | None = None) -> Callable:
    """Append the options of `groups` (size_options, attention_options, ..., or tuples of them) to a
    command's own; Typer passes them in as keyword arguments (**recipe). `shown`: option name -> the default
    --help shows for this command (edit's model and guidance), where it differs from the group's."""
    flat = [g for group in groups for g in (group if isinstance(group, tuple) else (group,))]

    def decorate(command: Callable) -> Callable:
        sig = inspect.signature(command, eval_str=True)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        shared = [p for g in flat for p in inspect.signature(g, eval_str=True).parameters.values()]
        shared = [_shown(p, (shown or {}).get(p.name)) for p in shared]
        command.__signature__ = sig.replace(parameters=own + [p.replace(kind=p.KEYWORD_ONLY) for p in shared])
        return command

    return decorate


def _shown(param: inspect.Parameter, default: str | None) -> inspect.Parameter:
    """The option with another default shown in --help (a copy: the group's stays as it is)."""
    if default is None:
        return param
    import copy

    info = copy.copy(param.default)
    info.show_default = default
    return param.replace(default=info)


def generate_options(recipe: dict[str, Any], from_image: Path | None = None, **own: Any) -> GenerateOptions:
    """GenerateOptions from the recipe options and a command's own: explicit flags win over --from,
    which wins over the defaults."""
    from dataclasses import replace

    from ..plan.records import options_from_record

    recipe = dict(recipe)
    recipe.pop("dry_run", None)  # the command's, not the run's
    if "no_compare_full" in recipe:  # output_options's flag, as the option the run takes
        recipe["compare_full"] = not recipe.pop("no_compare_full")
    w, h = dimensions(recipe.pop("res", None), recipe.pop("width", None), recipe.pop("height", None))
    for name in ("clear_weights", "control"):
        if name in recipe:
            recipe[name] = str(recipe[name]) if recipe[name] else None
    recipe["loras"], recipe["lora_files"] = (
        recipe.pop("lora", None) or None,
        recipe.pop("lora_file", None) or None,
    )
    recipe["proportional_attention"] = on_off(recipe["proportional_attention"], "--proportional-attention")
    long_sides = ints(recipe.pop("stages", None), "--stages")
    upscale_from, direct = recipe.pop("upscale_from", None), recipe.pop("direct", False)
    if upscale_from is not None or direct:
        if long_sides or (upscale_from is not None and direct):
            raise ConfigError("give only one of --stages, --upscale-from and --direct")
    given = {"width": w, "height": h, **recipe, **own}
    given = {k: v for k, v in given.items() if v is not None or k in ALWAYS}
    if from_image is not None:
        opts = options_from_record(record_from_image(from_image), **given)
    else:
        opts = GenerateOptions(**{"prompts": [], **given})  # GenerateOptions holds the defaults
    target = max(opts.width, opts.height)
    if upscale_from is not None and upscale_from >= target:
        raise ConfigError(
            f"--upscale-from {upscale_from} must be smaller than the target's long side ({target} px)"
        )
    if from_image is not None and w is not None and not (long_sides or upscale_from or direct):
        opts = replace(opts, stages=None)  # a size given over --from: its stages are the recipe's again
    if from_image is not None and (w is not None or long_sides or upscale_from or direct):
        opts = replace(opts, first_size=None)  # new stages: the recipe sizes their first pass again
    if from_image is not None and w is not None:  # and so is its guidance, which the recipe picks by size
        opts = replace(opts, **{k: None for k in ("guide", "guide_level") if k not in given})
    if direct:
        return replace(opts, stages=[target])
    if upscale_from is not None:
        return replace(opts, stages=[upscale_from, target])
    if long_sides:
        if w is None and from_image is None:  # no size given: the last stage is the target
            return replace(opts, stages=long_sides, width=long_sides[-1], height=long_sides[-1])
        return replace(opts, stages=long_sides)
    return opts
