"""Per-layer run statistics, computed inside the jitted step (nanodo's per-layer RMS, extended):
RMS of every parameter, gradient and update tensor by layer and kind, global norms, and the
activation RMS and attention-logit (and a mixture's router-logit) maximum each block sows into
Flax's 'intermediates'.

Names are the parameter paths with a kind prefix, e.g. `grad_rms/blocks/layers_1/mlp/up/kernel`
or `act_rms/blocks/layers_0`; a scanned stack (model.scan_layers) is split into its layers, so
both layouts log the same names.
"""
from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any
SCANNED = 'layers'  # BlockStack's nn.scan name: its leaves carry a leading layer axis


def _name(path: tuple) -> list[str]:
  return [str(getattr(k, 'key', getattr(k, 'name', k))) for k in path]


def _per_layer(path: tuple, x: jax.Array, reduce) -> dict[str, jax.Array]:
  """{name: reduce(x)}, or one entry per layer for a scanned stack's [layers, ...] leaf."""
  names = _name(path)
  if SCANNED in names:
    i = names.index(SCANNED)
    values = jax.vmap(reduce)(x)
    # the scan's 'block' wrapper adds a level: layers/block/attn -> layers_0/attn
    rest = names[i + 2:] if names[i + 1:i + 2] == ['block'] else names[i + 1:]
    return {'/'.join([*names[:i], f'layers_{j}', *rest]): values[j] for j in range(x.shape[0])}
  return {'/'.join(names): reduce(x)}


def rms(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))


def tree_rms(tree: PyTree, prefix: str) -> dict[str, jax.Array]:
  """RMS of every leaf of `tree`, named `prefix/PATH` (scanned stacks split per layer)."""
  out: dict[str, jax.Array] = {}
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    out.update({f'{prefix}/{k}': v for k, v in _per_layer(path, x, rms).items()})
  return out


def activation_stats(intermediates: PyTree) -> dict[str, jax.Array]:
  """Flatten the sown statistics: `act_rms/blocks/layers_0`, `logit_max/blocks/layers_0/attn`.
  Each sow is a 1-tuple (Flax appends); a scanned stack's values have a leading layer axis."""
  out: dict[str, jax.Array] = {}
  for path, x in jax.tree_util.tree_leaves_with_path(intermediates):
    names = [n for n in _name(path) if not n.isdigit() and not n.startswith('[')]
    kind, module_path = names[-1], tuple(path[:-2])  # drop the sow name and the tuple index
    for k, v in _per_layer(module_path, x, jnp.asarray).items():
      out[f'{kind}/{k}'] = v
  return out


def combine_activation_stats(a: dict[str, jax.Array], b: dict[str, jax.Array]
                             ) -> dict[str, jax.Array]:
  """Micro-batches' statistics added up (RMS: divided by their number after) or maxed (logits)."""
  return {k: jnp.maximum(a[k], b[k]) if k.startswith('logit_max/') else a[k] + b[k] for k in a}


def step_stats(params: PyTree, grads: PyTree, updates: PyTree, activations: dict[str, jax.Array]
               ) -> dict[str, jax.Array]:
  """Everything logged on a statistics step. `params` are those the step started from, `grads`
  the (averaged, unclipped) gradients, `updates` what the optimizer added."""
  return {**tree_rms(params, 'param_rms'), **tree_rms(grads, 'grad_rms'),
          **tree_rms(updates, 'update_rms'), **activations,
          'param_norm': optax.tree.norm(params), 'update_norm': optax.tree.norm(updates)}
