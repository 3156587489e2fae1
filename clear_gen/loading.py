"""Loading: the FLUX.1 pipeline (placed per --offload), its img2img twin, and CLEAR's checkpoint.

Everything here runs once per `generate` call, before the first image.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import WeightsError
from .plan import ClearChoice, GenerateOptions
from .positions import use_exact_positions


def clear_weights_file(choice: ClearChoice, token: str | None) -> Path | None:
    """The checkpoint of a registry variant (from the cache or the Hub), a custom file, or None."""
    from .hub import resolve_variant_file

    if choice.weights is not None or choice.label in ("custom", "none"):
        return choice.weights
    return resolve_variant_file(choice.label, token)


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
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            yield
    finally:
        diffusers.logging.set_verbosity(levels[0])
        transformers.logging.set_verbosity(levels[1])
        diffusers.logging.enable_progress_bar()
        transformers.logging.enable_progress_bar()


def load_pipeline(opts: GenerateOptions, device: torch.device, dtype: torch.dtype):
    """FluxPipeline from a registry base, Hub repo or local directory, placed per --offload."""
    from diffusers import FluxPipeline

    from .hub import resolve_base

    path = resolve_base(opts.model, opts.token)
    with _quiet_loading():
        try:
            pipe = FluxPipeline.from_pretrained(path, torch_dtype=dtype)
        except (OSError, ValueError) as e:
            raise WeightsError(
                f"{path} is not a complete FLUX.1 diffusers folder ({str(e).splitlines()[0][:160]}); "
                f"fetch one with `clear-gen download --base dev`"
            ) from e
        if opts.offload == "none":
            pipe.to(device)
        elif opts.offload == "model":
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.enable_sequential_cpu_offload(device=device)
    pipe.set_progress_bar_config(disable=True)
    use_exact_positions(pipe.transformer)  # RoPE sees integer positions in every stage and dtype
    return pipe


def load_clear_weights(path: Path) -> dict[str, torch.Tensor]:
    """A CLEAR .safetensors checkpoint into a state dict on the CPU."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise WeightsError(
            f"{path} is not a readable .safetensors checkpoint ({e}); download it again"
        ) from e


ACTIVATION_BYTES_PER_TOKEN_CHANNEL = 16  # live activations at a step's peak, in units of tokens x hidden


def place_clear_weights(state_dict: dict, transformer, tokens: int) -> dict:
    """The checkpoint on the transformer's GPU, in its dtype, when it fits beside the largest stage's
    activations: apply_clear/remove_clear then swap parameters instead of copying 3.6 GB each way (twice
    per image with the SDEdit recipe). Otherwise in pinned CPU memory, copied in at full bus speed.

    The activation estimate (16 x tokens x hidden x element size, ~22 GB at 8K in bf16) is a rough
    bound on what one FLUX block keeps alive at once, plus a 2 GiB margin.
    """
    param = transformer.x_embedder.weight
    if param.device.type != "cuda":
        return state_dict
    size = sum(v.numel() for v in state_dict.values()) * param.element_size()
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    activations = ACTIVATION_BYTES_PER_TOKEN_CHANNEL * tokens * hidden * param.element_size()
    free, _ = torch.cuda.mem_get_info(param.device)
    if free > size + activations + 2 * 2**30:
        return {k: v.to(param.device, param.dtype) for k, v in state_dict.items()}
    return {k: v.pin_memory() for k, v in state_dict.items()}


def img2img_pipeline(pipe):
    """FluxImg2ImgPipeline sharing pipe's modules as they are, with the recipe's static shift.

    Built directly rather than with `from_pipe`, which casts every shared module to float32 unless told
    a dtype (a bf16 run then crashes on mixed dtypes, and a 12B transformer doubles in size).
    """
    import inspect

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline

    wanted = inspect.signature(FluxImg2ImgPipeline.__init__).parameters
    img2img = FluxImg2ImgPipeline(**{k: v for k, v in pipe.components.items() if k in wanted})
    img2img.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        pipe.scheduler.config, use_dynamic_shifting=False
    )
    img2img.set_progress_bar_config(disable=True)
    return img2img


def prepared_pipeline(pipe, opts: GenerateOptions):
    """A pipeline built elsewhere, already on its device (`bench --what image`: random weights), made
    ready as load_pipeline leaves one: no progress bars, exact RoPE positions.

    --quantize (quantize.py, when it lands) applies here too, as in load_pipeline, so that a benchmark
    on random weights measures the same quantized transformer as a run on the real ones.
    """
    pipe.set_progress_bar_config(disable=True)
    use_exact_positions(pipe.transformer)
    return pipe
