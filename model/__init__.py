"""Models and inference. `from model import load_pretrained` loads a workdir, GGUF or HF checkpoint.

The import is lazy, so light modules (model.errors, model.config) do not pull in the whole stack.
"""


def __getattr__(name: str):
  if name == 'load_pretrained':
    from model.pretrained import load_pretrained
    return load_pretrained
  raise AttributeError(f'module model has no attribute {name!r}')
