"""Learned tokens (textual inversion): load a ``learned_embeds.safetensors`` into a tokenizer + text encoder.

File format: ``{token: (D,) or (1, D) tensor}``, the format diffusers' textual-inversion example writes and
``pipe.load_textual_inversion`` reads, so a token learned by HFI can stand for a concept anywhere a prompt goes.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Iterator, Mapping, Sequence

import torch
from safetensors.torch import load_file

from sdd.errors import UserError


def read_learned_embeds(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise UserError(f"learned_embeds: no such file: {path}")
    if not path.endswith(".safetensors"):
        raise UserError(f"learned_embeds: {path} is not a .safetensors file (pickles are never loaded)")
    try:
        state = load_file(path)
    except Exception as err:  # safetensors raises its own error type for corrupt files
        raise UserError(f"learned_embeds: cannot read {path}: {err}") from None
    if not state:
        raise UserError(f"learned_embeds: {path} holds no token")
    return {token: emb.reshape(-1) if emb.ndim == 2 and emb.shape[0] == 1 else emb for token, emb in state.items()}


def add_tokens(tokenizer, text_encoder, embeds: dict[str, torch.Tensor]) -> list[int]:
    """Add each token to the vocabulary with its embedding; return the new token ids."""
    table = text_encoder.get_input_embeddings()
    ids = []
    for token, emb in embeds.items():
        if emb.ndim != 1 or emb.shape[0] != table.weight.shape[1]:
            raise UserError(
                f"learned_embeds: token {token} has shape {tuple(emb.shape)}, but this text encoder's "
                f"embeddings have width {table.weight.shape[1]}"
            )
        if token in tokenizer.get_vocab():
            raise UserError(f"learned_embeds: token {token} is already in the tokenizer's vocabulary")
        tokenizer.add_tokens([token])
        ids.append(tokenizer.convert_tokens_to_ids(token))
    # mean_resizing=False: every new row is overwritten just below, so skip transformers' covariance sampling
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    table = text_encoder.get_input_embeddings()
    with torch.no_grad():
        for token_id, emb in zip(ids, embeds.values()):
            table.weight[token_id] = emb.to(table.weight.dtype)
    return ids


def load_learned_embeds(components, path: str) -> list[str]:
    embeds = read_learned_embeds(path)
    add_tokens(components.tokenizer, components.text_encoder, embeds)
    return list(embeds)


PLACEHOLDER_RE = re.compile(r"<[^<>\s]+>")


def check_placeholders(tokenizer, texts: Sequence[str]) -> None:
    """Refuse a text that names a learned token (``<red-hf>``) the tokenizer does not hold.

    Without its ``learned_embeds`` file such a token is split into ``<``, ``red``, ``-``, ``hf``, ``>`` and the
    method would silently erase (or steer away from) something else.
    """
    vocab = tokenizer.get_vocab()
    for text in texts:
        for token in PLACEHOLDER_RE.findall(text):
            if token not in vocab and token.lower() not in vocab:
                raise UserError(
                    f"'{text}' names the token {token}, which this tokenizer does not hold: load the file that "
                    "defines it with learned_embeds=PATH (sdd-generate: --learned-embeds PATH)"
                )


@contextlib.contextmanager
def substituted_embeddings(text_encoder, vectors: Mapping[int, torch.Tensor]) -> Iterator[None]:
    """Inside, token ``id`` embeds as ``vectors[id]`` (a tensor that may carry gradients), wherever it appears.

    The attacks and the adversarial training optimise a token's embedding (or a relaxed one-hot mixture of the
    vocabulary's) without touching the embedding table: hooks swap the looked-up rows, so the text encoder's own
    forward (positions, causal mask, final norm) runs unchanged and gradients reach the vectors. An id may lie
    beyond the table (a token added to a copy of the tokenizer only): it is looked up as row 0, then replaced.
    """
    layer = text_encoder.get_input_embeddings()
    ids = list(vectors)
    masks: list = []

    def before(module, args):
        input_ids = args[0] if args else None
        masks.clear()
        if input_ids is None:
            return None
        masks.extend((token_id, (input_ids == token_id).unsqueeze(-1)) for token_id in ids)
        beyond = input_ids >= module.weight.shape[0]
        return (input_ids.masked_fill(beyond, 0), *args[1:]) if beyond.any() else None

    def after(module, args, output):
        out = output
        for token_id, where in masks:
            if where.any():
                out = torch.where(where, vectors[token_id].to(out.dtype).expand_as(out), out)
        return out

    handles = [layer.register_forward_pre_hook(before), layer.register_forward_hook(after)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
