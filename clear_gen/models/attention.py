"""What CLEAR's processor (attention/processor.py) asks of an attention module, and the answer for diffusers'
joint attention modules, which several families share.

A family says, for each of its attention modules, how the module calls its processor (`call`) and what
it computes around the attention (`AttentionParts`): the projections of queries, keys and values, text
first, each with the RMSNorm it gets before RoPE, and what the module returns from the attention's
output. The processor then does everything CLEAR changes (token order, pooled keys, the masked kernel).

Joint attention (FluxAttention, Flux2Attention): an image stream (to_q, to_k, to_v, norm_q, norm_k,
to_out) and, in double-stream blocks, a text stream (add_q_proj, add_k_proj, add_v_proj, norm_added_q,
norm_added_k, to_add_out); single-stream FLUX.1 blocks have the image stream on [text ; image] and no
output projection. May import `core` and `errors` only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

Projection = Callable[[], Tensor]  # computes one projection, (B, l, H * D), when the processor needs it


class AttentionParts(NamedTuple):
    """An attention module's work around the attention, text first. Projections are computed one kind at
    a time (queries, then keys, then values), so that only one kind's raw projections are alive at once."""

    query: list[tuple[Projection, torch.nn.Module]]  # [(text's,) image's projection, and its RMSNorm]
    key: list[tuple[Projection, torch.nn.Module]]
    value: list[Projection]
    output: Callable[[Tensor], Any]  # attention output (B, L, H * D) -> what the module returns


class AttentionCall(NamedTuple):
    """A processor call's arguments by meaning."""

    hidden: Tensor  # (B, l, C): the image tokens, or [text ; image] in a single-stream block
    text: Tensor | None  # (B, T, C) in a double-stream block, else None
    mask: Tensor | None
    rope: tuple[Tensor, Tensor] | None  # cos, sin of [text ; image]


def joint_call(args: tuple, kwargs: dict) -> AttentionCall:
    """FluxAttnProcessor's positional order: hidden_states, encoder_hidden_states, attention_mask,
    image_rotary_emb."""
    names = ("hidden_states", "encoder_hidden_states", "attention_mask", "image_rotary_emb")
    given = {**dict(zip(names, args, strict=False)), **kwargs}
    return AttentionCall(*(given.get(name) for name in names))


def joint_parts(attn, hidden: Tensor, text: Tensor | None) -> AttentionParts:
    """The projections and output of a joint attention module, as FluxAttnProcessor computes them."""
    query = [(lambda: attn.add_q_proj(text), attn.norm_added_q)] if text is not None else []
    key = [(lambda: attn.add_k_proj(text), attn.norm_added_k)] if text is not None else []
    value = [lambda: attn.add_v_proj(text)] if text is not None else []
    query.append((lambda: attn.to_q(hidden), attn.norm_q))
    key.append((lambda: attn.to_k(hidden), attn.norm_k))
    value.append(lambda: attn.to_v(hidden))

    def output(out: Tensor):
        if text is None:  # a FLUX.1 single-stream block projects [attention ; MLP] itself
            return out
        text_len = text.shape[1]  # this rank's text tokens in sequence mode
        text_out, image = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(text_out.contiguous())

    return AttentionParts(query, key, value, output)
