"""Mixture-of-experts feed-forward (model.mlp=moe): a router sends each token to its top_k of
n_experts SwiGLU experts and mixes their outputs by the renormalised router probabilities
(Mixtral's routing). Two ways to run the experts, the same function when nothing overflows:

- dropless (capacity_factor = 0): the token copies sorted by expert and multiplied group by group
  with jax.lax.ragged_dot (a grouped matmul on TPU and GPU). Under a mesh it runs in shard_map:
  each device gathers the tokens of its peers on the expert axis, runs its own experts on the
  copies routed to them, and a reduce-scatter returns every token's mixed output to its device.
- capacity (capacity_factor > 0): GShard's dispatch and combine einsums. Each sequence gives every
  expert factor·top_k·t/n_experts slots, filled first choices first, in order; copies beyond are
  dropped (their token passes the residual unchanged for that expert). The expert axis of the
  dispatched tokens is constrained to the mesh's expert axis, so XLA turns the resharding into an
  all-to-all.

The layer sows its load-balancing loss (Switch Transformer: n_experts · Σ_e f_e·P_e, 1 when the
load is even), router z-loss (ST-MoE: mean log² Σ exp(router logit)) and dropped fraction into the
'moe' collection; the train step adds balance_loss·balance + router_z_loss·router_z, averaged
over layers (`aux_losses`), to the loss it differentiates.

Under µP the experts are hidden matrices (init std by model.init_scale here, Adam lr / width_mult
in train/state.py) and the router, whose output side is n_experts at every width, is a readout:
its logits are divided by the width multiplier, as the output layer's are.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from model.config import ModelConfig
from model.sharding import mesh_axes, param_init

Array = jax.Array
COLLECTION = 'moe'


def route(logits: Array, top_k: int) -> tuple[Array, Array]:
  """Router logits [..., e] -> (weights, experts) [..., k]: the top_k experts by probability and
  their probabilities renormalised to sum to 1."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weights, experts = jax.lax.top_k(probs, top_k)
  return weights / weights.sum(-1, keepdims=True), experts


def balance_loss(logits: Array, experts: Array) -> Array:
  """n_experts · Σ_e f_e·P_e over all tokens: f_e the fraction of token copies routed to expert e,
  P_e its mean router probability. 1 for an even load, n_experts when one expert takes all."""
  n = logits.shape[-1]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).reshape(-1, n)
  counts = jax.nn.one_hot(experts.reshape(-1), n, dtype=jnp.float32).mean(0)
  return n * jnp.sum(counts * probs.mean(0))


def router_z_loss(logits: Array) -> Array:
  """Mean over tokens of log²(Σ_e exp(logit_e)): keeps the router logits small (ST-MoE)."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))


def swiglu_experts(x: Array, gate: Array, up: Array, down: Array, matmul) -> Array:
  """silu(x·gate) * (x·up) · down with `matmul(x, kernel)` the per-expert product."""
  return matmul(nn.silu(matmul(x, gate)) * matmul(x, up), down)


def dropless_local(x: Array, experts: Array, weights: Array, gate: Array, up: Array, down: Array,
                   first: Array | int = 0) -> Array:
  """Σ_k weights·expert(x) over the copies routed to experts first..first+e-1 of `gate` [e, d, f]
  (the others contribute 0). x [n, d]; experts, weights [n, k] -> [n, d]."""
  n, k = experts.shape
  n_local = gate.shape[0]
  local = experts.reshape(-1) - first
  mine = (local >= 0) & (local < n_local)
  order = jnp.argsort(jnp.where(mine, local, n_local), stable=True)  # by expert; others last
  sizes = jnp.bincount(jnp.where(mine, local, n_local), length=n_local + 1)[:n_local]
  matmul = lambda h, w: jax.lax.ragged_dot(h, w.astype(h.dtype), sizes)
  y = swiglu_experts(x[order // k], gate, up, down, matmul)
  y = jnp.where(mine[order][:, None], y, 0)  # rows past the local groups are undefined: drop them
  y = y[jnp.argsort(order)].reshape(n, k, -1)  # back to (token, choice)
  return (y * weights.astype(y.dtype)[..., None]).sum(1)


def dropless(x: Array, experts: Array, weights: Array, gate: Array, up: Array, down: Array
             ) -> Array:
  """x [b, t, d] through the routed experts, nothing dropped; see the module docstring."""
  b, t, d = x.shape
  flat = lambda a: a.reshape(-1, a.shape[-1])
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or 'expert' not in mesh.axis_names:
    return dropless_local(flat(x), flat(experts), flat(weights), gate, up, down).reshape(b, t, d)
  rows = mesh_axes('act_batch', b)
  ep = mesh.shape['expert']
  gathered = 'expert' in rows and ep > 1

  def local(x, experts, weights, gate, up, down):
    if gathered:  # the tokens of every device on this device's expert axis
      x, experts, weights = (jax.lax.all_gather(a, 'expert', axis=0, tiled=True)
                             for a in (x, experts, weights))
    first = jax.lax.axis_index('expert') * gate.shape[0]
    y = dropless_local(flat(x), flat(experts), flat(weights), gate, up, down, first)
    y = y.reshape(x.shape)
    if gathered:
      return jax.lax.psum_scatter(y, 'expert', scatter_dimension=0, tiled=True)
    return jax.lax.psum(y, 'expert') if ep > 1 else y

  tokens = P(rows or None)
  kernel = P('expert')
  return jax.shard_map(local, in_specs=(tokens, tokens, tokens, kernel, kernel, kernel),
                       out_specs=tokens)(x, experts, weights, gate, up, down)


def capacity(n_experts: int, top_k: int, length: int, factor: float) -> int:
  """Slots per expert and sequence: factor · top_k · length / n_experts, rounded up, at least 1."""
  return max(1, math.ceil(factor * top_k * length / n_experts))


def dispatch_masks(experts: Array, weights: Array, n_experts: int, slots: int
                   ) -> tuple[Array, Array, Array]:
  """GShard's dispatch [b, t, e, c] (0/1: token t goes to slot c of expert e) and combine (the
  same, times the routing weight) masks, and the fraction of copies dropped. Slots fill per
  sequence in order of choice, then position: every first choice before any second."""
  b, t, k = experts.shape
  onehot = jax.nn.one_hot(experts, n_experts, dtype=jnp.int32)          # [b, t, k, e]
  by_choice = onehot.transpose(0, 2, 1, 3).reshape(b, k * t, n_experts)
  slot = (jnp.cumsum(by_choice, axis=1) - 1).reshape(b, k, t, n_experts).transpose(0, 2, 1, 3)
  kept = onehot * (slot < slots)                                          # [b, t, k, e]
  where = jax.nn.one_hot(jnp.where(kept > 0, slot, -1), slots, dtype=jnp.float32)  # [b,t,k,e,c]
  dispatch = where.sum(2)                                # one token never picks an expert twice
  combine = jnp.einsum('btkec,btk->btec', where, weights.astype(jnp.float32))
  dropped = 1.0 - kept.sum() / (b * t * k)
  return dispatch, combine, dropped


def with_capacity(x: Array, experts: Array, weights: Array, gate: Array, up: Array, down: Array,
                  factor: float) -> tuple[Array, Array]:
  """x [b, t, d] through the routed experts with per-sequence slots; returns the output and the
  fraction of token copies dropped."""
  n_experts = gate.shape[0]
  slots = capacity(n_experts, experts.shape[-1], x.shape[1], factor)
  dispatch, combine, dropped = dispatch_masks(experts, weights, n_experts, slots)
  constrain = lambda a, last: nn.with_logical_constraint(
      a, ('act_batch_no_expert', 'act_expert', None, last))
  inputs = constrain(jnp.einsum('btec,btd->becd', dispatch.astype(x.dtype), x), 'act_embed')
  matmul = lambda h, w: jnp.einsum('becd,edf->becf', h, w.astype(h.dtype))
  y = constrain(swiglu_experts(inputs, gate, up, down, matmul), 'act_embed')
  return jnp.einsum('btec,becd->btd', combine.astype(y.dtype), y), dropped


class MoeMlp(nn.Module):
  """The mixture-of-experts feed-forward block: [b, t, d] -> [b, t, d]."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = self.cfg
    e, d, f = c.n_experts, c.d_model, c.d_ff
    std = 0.02 * c.init_scale  # the experts map a width to a width, as the dense projections do
    router = self.param('router', param_init(0.02, ('embed', None)), (d, e), c.weight_dtype)
    gate = self.param('gate', param_init(std, ('expert', 'embed', 'mlp')), (e, d, f), c.weight_dtype)
    up = self.param('up', param_init(std, ('expert', 'embed', 'mlp')), (e, d, f), c.weight_dtype)
    down = self.param('down', param_init(std / math.sqrt(2 * c.n_layers), ('expert', 'mlp', 'embed')),
                      (e, f, d), c.weight_dtype)
    x = x.astype(c.compute_dtype)
    logits = jnp.einsum('btd,de->bte', x.astype(jnp.float32), router.astype(jnp.float32))
    if c.width_mult != 1.0:  # µP: the router is a readout (width in, n_experts out), scaled as one
      logits = logits / c.width_mult
    weights, experts = route(logits, c.top_k)
    kernels = tuple(w.astype(c.compute_dtype) for w in (gate, up, down))
    if c.capacity_factor:
      y, dropped = with_capacity(x, experts, weights, *kernels, c.capacity_factor)
    else:
      y, dropped = dropless(x, experts, weights, *kernels), jnp.zeros((), jnp.float32)
    if self.is_mutable_collection('intermediates'):  # run statistics (train/stats.py) only
      self.sow('intermediates', 'logit_max', logits.max())
    if self.is_mutable_collection(COLLECTION):  # the train step's auxiliary losses
      self.sow(COLLECTION, 'balance', balance_loss(logits, experts))
      self.sow(COLLECTION, 'router_z', router_z_loss(logits))
      self.sow(COLLECTION, 'dropped', dropped)
    return y


def aux_losses(sown: dict, cfg: ModelConfig) -> dict[str, Array]:
  """The 'moe' collection of one forward pass -> the auxiliary loss to add (`moe_loss`) and its
  parts, each the mean over the MoE layers."""
  by_name: dict[str, list[Array]] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(sown)[0]:
    name = next(k.key for k in reversed(path) if isinstance(k, jax.tree_util.DictKey))
    by_name.setdefault(name, []).append(jnp.ravel(leaf))
  parts = {f'moe_{k}': jnp.concatenate(v).mean() for k, v in by_name.items()}
  parts['moe_loss'] = (cfg.balance_loss * parts['moe_balance']
                       + cfg.router_z_loss * parts['moe_router_z'])
  return parts
