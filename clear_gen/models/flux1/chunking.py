"""Feed-forward chunking: FLUX's MLPs run over slices of tokens, the same numbers in a fraction of the memory.

A FLUX block's MLP is 4x wider than its hidden size, and each single-stream block concatenates its
attention output with the MLP's (5x the hidden size) before projecting back. At 8192 px (262,656
tokens x 3072 channels, 1.6 GB per bf16 copy) these are the largest tensors of a step. Every
operation in them works token by token, so running them over `tokens` tokens at a time and writing
each slice into one output tensor changes no value: only the peak memory (see memory.py).

`chunk_feed_forward(transformer, tokens)` changes, in place and undone by `tokens=None`:
- each double-stream block's `ff` and `ff_context`: token slices in, one output tensor out;
- each single-stream block's forward: attention first, then the MLP and the output projection over
  token slices (the stock block computes the MLP first and keeps it alive during attention).
Modules and parameter names stay as they are (a CLEAR checkpoint, an offload hook or a quantized
Linear sees the same model): only the instances' `forward` is replaced.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

_SAVED = "_unchunked_forward"  # the instance's forward before chunking (None: the class's)


def chunk_feed_forward(transformer, tokens: int | None) -> None:
    """Run the transformer's feed-forwards `tokens` tokens at a time; None restores the stock forwards."""
    if tokens is not None and tokens < 1:
        raise ValueError(f"tokens must be positive, got {tokens}")
    for block in transformer.transformer_blocks:
        replace_forward(block.ff, tokens, chunked_ff)
        replace_forward(block.ff_context, tokens, chunked_ff)
    for block in transformer.single_transformer_blocks:
        replace_forward(block, tokens, _chunked_single_block)
    transformer._ff_chunk_tokens = tokens


def chunk_tokens(transformer) -> int | None:
    """The transformer's feed-forward chunk in tokens; None when it runs them whole."""
    return getattr(transformer, "_ff_chunk_tokens", None)


def replace_forward(module: torch.nn.Module, tokens: int | None, chunked) -> None:
    """Put `chunked` in front of module's forward (an offload hook's, if any), or take it away."""
    if hasattr(module, _SAVED):  # undo a previous chunking first
        saved = getattr(module, _SAVED)
        if saved is None:
            del module.forward
        else:
            module.forward = saved
        delattr(module, _SAVED)
    if tokens is None:
        return
    setattr(module, _SAVED, module.__dict__.get("forward"))
    module.forward = partial(chunked, module, module.forward, tokens)


def chunked_ff(ff, forward, tokens: int, hidden_states: Tensor, *args, **kwargs) -> Tensor:
    """FeedForward over token slices of (B, L, C), written into one (B, L, C_out) output."""
    length = hidden_states.shape[1]
    if length <= tokens:
        return forward(hidden_states, *args, **kwargs)
    out = None
    for start in range(0, length, tokens):
        part = forward(hidden_states[:, start : start + tokens], *args, **kwargs)  # (B, l, C_out)
        if out is None:
            out = part.new_empty((*hidden_states.shape[:2], part.shape[-1]))
        out[:, start : start + tokens] = part
        del part
    return out


def _chunked_single_block(
    block,
    forward,
    tokens: int,
    hidden_states: Tensor,
    encoder_hidden_states: Tensor,
    temb: Tensor,
    image_rotary_emb: tuple[Tensor, Tensor] | None = None,
    joint_attention_kwargs: dict | None = None,
) -> tuple[Tensor, Tensor]:
    """FluxSingleTransformerBlock.forward with its MLP and output projection over token slices.

    The same operations as diffusers' block on each token, in the same dtypes: attention over the
    whole sequence, then per slice proj_out(cat(attention, gelu(proj_mlp(x)))), then the gate and
    the residual over the whole sequence.
    """
    text_len = encoder_hidden_states.shape[1]
    if text_len + hidden_states.shape[1] <= tokens:
        return forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs)
    residual = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # (B, T + N, C)
    norm_hidden_states, gate = block.norm(residual, emb=temb)
    attn_output = block.attn(
        hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {})
    )  # (B, T + N, C)
    projected = None
    for start in range(0, residual.shape[1], tokens):
        part = slice(start, start + tokens)
        mlp = block.act_mlp(block.proj_mlp(norm_hidden_states[:, part]))  # (B, l, 4C)
        joined = torch.cat([attn_output[:, part], mlp], dim=2)  # (B, l, 5C)
        del mlp
        out = block.proj_out(joined)  # (B, l, C)
        del joined
        if projected is None:
            projected = out.new_empty(residual.shape)
        projected[:, part] = out
        del out
    del norm_hidden_states, attn_output
    hidden_states = residual + gate.unsqueeze(1) * projected
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return hidden_states[:, :text_len], hidden_states[:, text_len:]
