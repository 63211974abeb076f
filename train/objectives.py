"""Training objectives. Each returns a loss SUM and metric sums; the weight (scored tokens: the
batch's `weights`, or the objective's own aux['weight'] as masked LM returns) is summed too, so
micro-batches and devices add up exactly: the step divides by the weight of the whole batch."""
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

Batch = dict[str, jax.Array]
# (params, batch, rng) -> (loss_sum, metric sums); metric sums are divided by the batch weight.
LossFn = Callable[[Any, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood in f32. logits: [b, t, v], targets: [b, t] -> [b, t];
  optax's softmax cross-entropy, with its gradient written out (`_nll`)."""
  return _nll(logits.astype(jnp.float32), targets)


@jax.custom_vjp
def _nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log-sum-exp minus the target's logit. The gradient, softmax minus the one-hot target, is one
  elementwise expression: autodiff's transposes take_along_axis into a scatter, which XLA runs
  as a pass of its own over the [b, t, v] f32 gradient and which keeps the cast to the head's
  bf16 matmuls out of the softmax backward (GPT-2 small's step compiled for an H100)."""
  return _nll_fwd(logits, targets)[0]


def _nll_fwd(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, tuple]:
  lse = jax.nn.logsumexp(logits, axis=-1)
  return lse - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0], (logits, targets, lse)


def _nll_bwd(res: tuple, g: jax.Array) -> tuple[jax.Array, None]:
  logits, targets, lse = res
  target = jnp.arange(logits.shape[-1]) == targets[..., None]
  return (jnp.exp(logits - lse[..., None]) - target) * g[..., None], None


_nll.defvjp(_nll_fwd, _nll_bwd)


def scored_sums(logits: jax.Array, labels: jax.Array, w: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross-entropy and correct argmax predictions, each summed with weights `w` (labels' shape)."""
  correct = (logits.argmax(-1) == labels).astype(jnp.float32)
  return (token_nll(logits, labels) * w).sum(), {'accuracy': (correct * w).sum()}


def z_loss_sum(logits: jax.Array, w: jax.Array) -> jax.Array:
  """Sum of log(Z)^2 over the tokens, weighted by `w`: pulls each row's softmax normaliser
  towards 1, so the output logits cannot drift to large values (PaLM's auxiliary z-loss)."""
  log_z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  return (jnp.square(log_z) * w).sum()


def batch_weight(batch: Batch) -> jax.Array:
  """Number of scored target tokens: the denominator of every token-level loss."""
  return batch['weights'].sum()


def logit_sums(logits: jax.Array, labels: jax.Array, w: jax.Array, z_loss: bool = False
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`scored_sums`, with the z-loss sum as metrics['z_loss'] when asked."""
  loss_sum, metrics = scored_sums(logits, labels, w)
  if z_loss:
    metrics['z_loss'] = z_loss_sum(logits, w)
  return loss_sum, metrics


def chunked_sums(output_layer: Callable[[jax.Array], jax.Array], hidden: jax.Array,
                 labels: jax.Array, w: jax.Array, chunk: int, z_loss: bool = False
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`logit_sums` of output_layer(hidden) [b, t, d] -> [b, t, v], `chunk` positions at a time.

  A lax.scan over chunks whose body (output layer and loss) is rematerialised: forward and
  backward hold one chunk's logits [b, chunk, v] instead of [b, t, v], for one more output-layer
  matmul. A length that is not a multiple of `chunk` pads the last chunk with weight 0 (any
  seq_len works, at the cost of at most chunk - 1 positions of wasted compute).
  """
  t = hidden.shape[1]
  chunk = min(chunk, t)
  n = -(-t // chunk)

  def split(x: jax.Array) -> jax.Array:  # [b, t, ...] -> [n, b, chunk, ...]
    x = jnp.pad(x, [(0, 0), (0, n * chunk - t)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(x.shape[0], n, chunk, *x.shape[2:]).swapaxes(0, 1)

  @functools.partial(jax.checkpoint, prevent_cse=False)  # a scan body needs no CSE barrier
  def one(xs):
    h, y, wc = xs
    return logit_sums(output_layer(h), y, wc, z_loss)

  _, sums = jax.lax.scan(lambda carry, xs: (carry, one(xs)), None,
                         (split(hidden), split(labels), split(w)))
  return jax.tree.map(lambda s: s.sum(0), sums)


def model_sums(apply_fn: Callable[..., jax.Array], params: Any, inputs: tuple, labels: jax.Array,
               w: jax.Array, rng: jax.Array, loss_chunk: int = 0, z_loss: bool = False,
               **kwargs) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`logit_sums` of the model's logits for `inputs` (and keyword `kwargs`) against `labels`.

  With `loss_chunk` > 0 the model returns its final hidden states (method='features') and its own
  output layer (method='logits': tied or untied, soft-capped, LoRA merged) runs in
  `chunked_sums`, so no [b, t, v] array exists in the step, forward or backward.
  """
  variables = {'params': params}
  if not loss_chunk:
    logits = apply_fn(variables, *inputs, rngs={'dropout': rng}, **kwargs)
    return logit_sums(logits, labels, w, z_loss)
  hidden = apply_fn(variables, *inputs, rngs={'dropout': rng}, method='features', **kwargs)
  return chunked_sums(lambda h: apply_fn(variables, h, method='logits'), hidden, labels, w,
                      loss_chunk, z_loss)


def causal_lm_loss(apply_fn: Callable[..., jax.Array], loss_chunk: int = 0,
                   z_loss: bool = False) -> LossFn:
  """Next-token prediction on packed rows; `weights` masks padding, document ends, and prompts
  (SFT). `loss_chunk` and `z_loss` (aux['z_loss'], the log(Z)^2 sum) as in `model_sums`."""
  def loss(params, batch: Batch, rng: jax.Array):
    return model_sums(apply_fn, params, (batch['inputs'], batch['positions'], batch['segment_ids']),
                      batch['targets'], batch['weights'], rng, loss_chunk, z_loss)
  return loss


def seq2seq_loss(apply_fn: Callable[..., jax.Array], loss_chunk: int = 0,
                 z_loss: bool = False) -> LossFn:
  """Encoder-decoder (T5): the causal LM loss of the decoder rows (`inputs` = [BOS] + target,
  `targets` = target + [EOS]) given each row's `encoder_inputs`, `encoder_segment_ids` (0 = padding)
  and `encoder_positions`."""
  def loss(params, batch: Batch, rng: jax.Array):
    return model_sums(apply_fn, params, (batch['encoder_inputs'], batch['inputs']),
                      batch['targets'], batch['weights'], rng, loss_chunk, z_loss,
                      encoder_positions=batch['encoder_positions'],
                      encoder_segment_ids=batch['encoder_segment_ids'],
                      positions=batch['positions'], segment_ids=batch['segment_ids'])
  return loss


def mask_tokens(rng: jax.Array, inputs: jax.Array, eligible: jax.Array, mask_id: int, vocab: int,
                rate: float = 0.15) -> tuple[jax.Array, jax.Array]:
  """BERT corruption: pick `rate` of the eligible tokens; of those 80% become `mask_id`, 10% a
  random token, 10% stay. Returns (corrupted inputs, picked [b, t] bool)."""
  pick_rng, how_rng, tok_rng = jax.random.split(rng, 3)
  picked = eligible & jax.random.bernoulli(pick_rng, rate, inputs.shape)
  how = jax.random.uniform(how_rng, inputs.shape)
  random_tokens = jax.random.randint(tok_rng, inputs.shape, 0, vocab, inputs.dtype)
  corrupted = jnp.where(how < 0.8, mask_id, jnp.where(how < 0.9, random_tokens, inputs))
  return jnp.where(picked, corrupted, inputs), picked


def masked_lm_loss(apply_fn: Callable[..., jax.Array], mask_id: int, loss_chunk: int = 0
                   ) -> LossFn:
  """Masked-LM on packed rows: predict the original `inputs` at the corrupted positions.

  Masks are drawn from the step's rng (a function of seed and step), so a resumed run masks
  exactly as the uninterrupted one. The loss is normalised by the number of picked tokens, which
  the objective returns as its `weight` (see `objective_weight`). `mask_id` is the pad id: padding
  never shares a segment with real tokens, so its embedding is free to mean [MASK]. `loss_chunk`
  as in `model_sums`.
  """
  def loss(params, batch: Batch, rng: jax.Array):
    mask_rng, dropout_rng = jax.random.split(rng)
    inputs = batch['inputs']
    vocab = params['embed']['embedding'].shape[0]
    corrupted, picked = mask_tokens(mask_rng, inputs, batch['weights'] > 0, mask_id, vocab)
    w = picked.astype(jnp.float32)
    loss_sum, metrics = model_sums(apply_fn, params, (corrupted, batch['positions'],
                                                      batch['segment_ids']),
                                   inputs, w, dropout_rng, loss_chunk)
    return loss_sum, {**metrics, 'weight': w.sum()}
  return loss


def classification_loss(apply_fn: Callable[..., jax.Array]) -> LossFn:
  """Cross-entropy of one class per row: a classifier's logits [b, classes] (model/heads.py
  ClassifierModel) against `labels` [b], each row weighted by `weights` [b] (0 on rows that only
  fill a batch); the weight is the number of examples, so loss and accuracy are per example."""
  def loss(params, batch: Batch, rng: jax.Array):
    logits = apply_fn({'params': params}, batch['inputs'], batch['positions'], batch['segment_ids'],
                      rngs={'dropout': rng})
    loss_sum, metrics = scored_sums(logits, batch['labels'], batch['weights'])
    return loss_sum, {**metrics, 'weight': batch['weights'].sum()}
  return loss


def objective_weight(aux: dict[str, jax.Array], batch: Batch) -> jax.Array:
  """The loss denominator: the objective's own `weight` (masked LM) or the batch's target tokens.
  Removes it from `aux`, leaving only metric sums."""
  return aux.pop('weight') if 'weight' in aux else batch_weight(batch)


def objective_for(family: str, pad_id: int, loss_chunk: int = 0, z_loss: bool = False
                  ) -> Callable[[Callable[..., jax.Array]], LossFn]:
  """The pretraining objective of a model family: causal LM (decoder), masked LM (encoder) or
  seq2seq (encoder-decoder; span corruption is in its data, data/seq2seq.py). `loss_chunk` and
  `z_loss` as in `model_sums` (masked LM has no z-loss: train/step.py refuses it)."""
  if family == 'encoder':
    return functools.partial(masked_lm_loss, mask_id=pad_id, loss_chunk=loss_chunk)
  lm_loss = seq2seq_loss if family == 'encoder_decoder' else causal_lm_loss
  return functools.partial(lm_loss, loss_chunk=loss_chunk, z_loss=z_loss)
