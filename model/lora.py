"""LoRA adapters outside the layers: folding them into the base weights for export and inference.

The adapters themselves live in model/layers.py `Linear` (collection 'lora': lora_a [*in, r],
lora_b [r, *out], scale alpha / r); this module only rearranges trees.
"""
from typing import Any

import jax
import jax.numpy as jnp

from model.config import ModelConfig

PyTree = Any


def merge_lora(params: PyTree, lora: PyTree, cfg: ModelConfig) -> PyTree:
  """Base params with every adapter folded in: kernel + (alpha / r) · lora_a @ lora_b.

  The result is a plain parameter tree of the base's structure (no 'lora' collection needed), so
  generation, export and `load_pretrained` treat a fine-tuned model like any other.
  """
  if not lora:
    return params
  scale = cfg.lora_alpha / cfg.lora_rank

  def merge(node: PyTree, adapters: PyTree) -> PyTree:
    out = dict(node)
    for name, sub in adapters.items():
      if 'lora_a' in sub:
        kernel = node[name]['kernel']
        out[name] = {**node[name], 'kernel': kernel + scale * lora_delta(sub['lora_a'], sub['lora_b'],
                                                                          kernel.ndim).astype(kernel.dtype)}
      else:
        out[name] = merge(node[name], sub)
    return out

  return merge(params, lora)


def merged_params(variables: dict[str, PyTree], cfg: ModelConfig) -> PyTree:
  """A plain parameter tree to generate (or export) from: the model's variables with the adapters
  in variables['lora'], if any, folded into variables['params']."""
  return merge_lora(variables['params'], variables.get('lora'), cfg)


def lora_delta(a: jax.Array, b: jax.Array, kernel_ndim: int) -> jax.Array:
  """a @ b over the rank axis, with the kernel's shape [*in, *out]; when layers are scanned the
  kernel, a and b share a leading layer axis, which is kept."""
  if kernel_ndim == a.ndim + b.ndim - 2:
    return jnp.tensordot(a, b, axes=1)
  return jax.vmap(lambda a_, b_: jnp.tensordot(a_, b_, axes=1))(a, b)


def count_params(tree: PyTree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))
