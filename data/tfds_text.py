"""Local text files as a TFDS dataset (array_record), so a private corpus can take the `tfds:` path.

    name = build_text_tfds('/data/shakespeare/*.txt', data_dir='/data/tfds', config='shakespeare')
    # then: data.source = 'tfds:' + name, data.data_dir = '/data/tfds'

Each file is one document; 'validation' holds the last eval_fraction of each file and 'train' the
rest (the `text:` split). Reading it back needs neither this module nor TensorFlow: TFDS opens the
prepared files from data_dir by name.
"""
from __future__ import annotations

import tensorflow_datasets as tfds

from data import sources

BUILDER_NAME = 'local_text_files'


class LocalTextFiles(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Files matching a glob -> {'text'} records in 'train' and 'validation' splits."""

  name = BUILDER_NAME
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Local text files, one document per file.'}

  def __init__(self, *, pattern: str, eval_fraction: float, **kwargs):
    self._pattern = pattern
    self._eval_fraction = eval_fraction
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=f'Text files {self._pattern}',
                                 features=tfds.features.FeaturesDict({'text': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    files = sources.read_text_files(self._pattern)
    halves = [(path, sources.split_tail(text, self._eval_fraction)) for path, text in files]
    return {'train': self._generate_examples([(p, head) for p, (head, _) in halves if head]),
            'validation': self._generate_examples([(p, tail) for p, (_, tail) in halves if tail])}

  def _generate_examples(self, docs: list[tuple[str, str]]):
    for path, text in docs:
      yield path, {'text': text}


def build_text_tfds(pattern: str, data_dir: str, config: str = 'default', eval_fraction: float = 0.1) -> str:
  """Prepares the files under data_dir and returns the dataset name for `tfds:NAME`."""
  builder = LocalTextFiles(pattern=pattern, eval_fraction=eval_fraction, data_dir=data_dir,
                           config=tfds.core.BuilderConfig(name=config), file_format='array_record')
  builder.download_and_prepare()
  return f'{BUILDER_NAME}/{config}'
