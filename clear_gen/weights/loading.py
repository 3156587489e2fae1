"""Loading: the model family's pipeline (placed per --offload; its transformer and main text encoder (FLUX.1's
T5) quantized per --quantize and --quantize-text, or the transformer from a GGUF file; its --lora adapters;
with --controlnet, diffusers' ControlNet pipeline), its img2img twin, and CLEAR's checkpoint.

Everything here runs once per `generate` call, before the first image.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .. import models
from ..errors import WeightsError
from . import gguf
from . import quantize as Q
from .control import controlnet_pipeline, load_controlnet
from .lora import load_loras
from .spec import WeightsSpec


def clear_weights_file(hub_variant: str | None, local: Path | None, token: str | None) -> Path | None:
    """A CLEAR checkpoint: a local file, a registry variant's (from the cache or the Hub), or None."""
    from .hub import resolve_variant_file

    return local if hub_variant is None else resolve_variant_file(hub_variant, token)


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """No loading bars, accelerate hints or deprecation notes from diffusers and transformers."""
    import warnings

    import diffusers
    import transformers

    levels = diffusers.logging.get_verbosity(), transformers.logging.get_verbosity()
    diffusers.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    diffusers.logging.disable_progress_bar()
    transformers.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings(), Q.quiet_imports():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            yield
    finally:
        diffusers.logging.set_verbosity(levels[0])
        transformers.logging.set_verbosity(levels[1])
        diffusers.logging.enable_progress_bar()
        transformers.logging.enable_progress_bar()


def load_pipeline(weights: WeightsSpec, offload: str, device: torch.device, dtype: torch.dtype):
    """The model family's pipeline (FLUX.1's: FluxPipeline) from a registry base, Hub repo or local
    directory, placed per the decided `offload` (none, model or sequential); its transformer from a GGUF
    file or quantized on load (--quantize), its main text encoder quantized on load (--quantize-text), its
    LoRAs. With a ControlNet: FluxControlNetPipeline with the same modules and the ControlNet (in the
    compute dtype)."""
    from .hub import resolve_base

    path = resolve_base(weights.model, weights.token, transformer_weights=weights.transformer is None)
    control, family = weights.controlnet, models.family(weights.family)
    with _quiet_loading():
        parts = {
            "transformer": load_transformer(weights, path, dtype),
            family.TEXT_ENCODER: load_text_encoder(weights, path, dtype),
        }
        try:
            pipe = family.pipeline_class().from_pretrained(
                path, torch_dtype=dtype, **{k: v for k, v in parts.items() if v is not None}
            )
        except (OSError, ValueError) as e:
            raise WeightsError(
                f"{path} is not a complete {family.LABEL} diffusers folder ({str(e).splitlines()[0][:160]}); "
                f"fetch one with `clear-gen download --base {_base_name(weights.model)}`"
            ) from e
        load_loras(pipe, weights.loras, weights.token)  # before offload
        if control is not None:  # before offload too: model offload then moves it with the transformer
            pipe = controlnet_pipeline(pipe, load_controlnet(control, pipe.transformer, dtype, weights.token))
        if offload == "none":
            pipe.to(device)
        elif offload == "model":
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.enable_sequential_cpu_offload(device=device)
    pipe.set_progress_bar_config(disable=True)
    family.use_exact_positions(pipe.transformer)  # RoPE sees integer positions in every stage and dtype
    if control is not None:
        family.use_exact_positions(pipe.controlnet)
    return pipe


def _base_name(model: str) -> str:
    """--model's registry name, for a download hint; else dev."""
    from .registry import load_registry, named

    base = named(load_registry().bases, model)
    return base.name if base is not None else "dev"


def load_transformer(weights: WeightsSpec, base: Path, dtype: torch.dtype):
    """The transformer when it is not the base's as stored: a GGUF file (checked against the base's config
    first), or the base's quantized while it loads (--quantize). None: the pipeline loads the base's."""
    from .hub import resolve_transformer_file

    transformer_class = models.family(weights.family).transformer_class()
    if weights.transformer is not None:
        file = resolve_transformer_file(weights.transformer, weights.token)
        config = transformer_class.load_config(base, subfolder="transformer")
        gguf.check_gguf_transformer(file, config)
        with _load_errors(file):
            return transformer_class.from_single_file(
                str(file),
                config=str(base),
                subfolder="transformer",
                quantization_config=gguf.gguf_config(dtype),
                torch_dtype=dtype,
                local_files_only=True,
            )
    quantization = Q.transformer_config(weights.quantize, dtype)
    return _quantized(transformer_class, base, "transformer", dtype, quantization)


def load_text_encoder(weights: WeightsSpec, base: Path, dtype: torch.dtype):
    """The family's main text encoder (FLUX.1's T5) quantized while it loads (--quantize-text), or None:
    the pipeline loads the base's."""
    quantization = Q.text_config(weights.quantize_text, dtype)
    family = models.family(weights.family)
    return _quantized(family.text_encoder_class(), base, family.TEXT_ENCODER, dtype, quantization)


def _quantized(kind, base: Path, subfolder: str, dtype: torch.dtype, quantization):
    """The base's `subfolder` component as `kind`, quantized while it loads; None without a quantization."""
    if quantization is None:
        return None
    with _load_errors(base / subfolder):
        return kind.from_pretrained(
            base, subfolder=subfolder, torch_dtype=dtype, quantization_config=quantization
        )


def check_transformer_file(weights: WeightsSpec) -> None:
    """Before anything loads: a GGUF --transformer already on disk (a local file, or cached) is a whole FLUX.1
    transformer, and the base's when the base's config is on disk too. Else it is checked once fetched."""
    import json

    from .hub import (
        base_for,
        cached_base,
        cached_file,
        local_model,
        transformer_source,
        without_transformer_weights,
    )

    if weights.transformer is None:
        return
    source = transformer_source(weights.transformer)
    file = source if isinstance(source, Path) else cached_file(*source)
    if file is None:
        return
    base = local_model(weights.model) or cached_base(without_transformer_weights(base_for(weights.model)))
    config = base / "transformer" / "config.json" if base is not None else None
    if config is None or not config.is_file():
        gguf.check_gguf_file(file)
    else:
        gguf.check_gguf_transformer(file, json.loads(config.read_text()))


@contextmanager
def _load_errors(path: Path) -> Iterator[None]:
    """A component that does not load: one WeightsError naming it."""
    try:
        yield
    except (OSError, ValueError) as e:
        raise WeightsError(
            f"{path} did not load ({str(e).splitlines()[0][:160]}); check the file or download it again"
        ) from e


def load_clear_weights(path: Path) -> dict[str, torch.Tensor]:
    """A CLEAR .safetensors checkpoint into a state dict on the CPU."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise WeightsError(
            f"{path} is not a readable .safetensors checkpoint ({e}); download it again"
        ) from e


def img2img_pipeline(pipe):
    """FluxImg2ImgPipeline (FluxControlNetImg2ImgPipeline when pipe has a ControlNet) sharing pipe's modules
    as they are, with the recipe's static shift.

    Built directly rather than with `from_pipe`, which casts every shared module to float32 unless told
    a dtype (a bf16 run then crashes on mixed dtypes, and a 12B transformer doubles in size).
    """
    import inspect

    from diffusers import FlowMatchEulerDiscreteScheduler

    family = models.of(pipe.transformer)
    kind = family.pipeline_class(img2img=True, controlnet="controlnet" in pipe.components)
    wanted = inspect.signature(kind.__init__).parameters
    img2img = kind(**{k: v for k, v in pipe.components.items() if k in wanted})
    img2img.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        pipe.scheduler.config, use_dynamic_shifting=False
    )
    img2img.set_progress_bar_config(disable=True)
    return img2img


def prepared_pipeline(pipe, quantize: str):
    """A pipeline built elsewhere, already on its device (`bench --what image`: random weights), made
    ready as load_pipeline leaves one: no progress bars, exact RoPE positions.

    --quantize applies here too (quantize.quantize_built: the same torchao config as load_pipeline's),
    so that a benchmark on random weights measures the same quantized transformer as a run on real ones.
    """
    Q.quantize_built(pipe.transformer, quantize)
    pipe.set_progress_bar_config(disable=True)
    models.of(pipe.transformer).use_exact_positions(pipe.transformer)
    return pipe
