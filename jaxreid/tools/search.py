"""Search a folder of person crops for the people in query images, with a trained model.

  jaxreid-search --model=workdirs/mmt_duke_to_market --query=person.jpg --gallery=crops/ \\
      [--topk=10] [--out=retrieval.png] [--export_features=DIR]
  (or python -m jaxreid.tools.search ...)

`--query` is an image file or a folder, `--gallery` a folder (image files directly inside it).
Images of any size and mode (grayscale, RGBA, palette; PNG, JPEG, BMP, ...) are converted to RGB
and resized to the model's input size exactly as in training; unreadable files are reported by
name and skipped. For every query the ranked gallery matches are printed (squared Euclidean
distance between unit features, 0..4), and with `--out` a picture of the top-k lists is written.
When all file names follow the Market-1501 convention `<pid>_c<camera>...` (e.g.
0002_c1s1_000451_03.jpg), true / false matches are marked green / red by identity; otherwise the
frames are grey. Model flags as for `jaxreid-evaluate` (a work dir or a .msgpack, config.json
overrides). Errors are one line; exit status 2.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Sequence

from absl import flags

from jaxreid import inference
from jaxreid import retrieval_figure
from jaxreid import search
from jaxreid.tools import common
from jaxreid.tools import inference_flags

FLAGS = common.flag_values()
flags.DEFINE_string('model', None, common.MODEL_HELP, flag_values=FLAGS)
flags.DEFINE_string('query', None, 'an image file or a folder of images', flag_values=FLAGS)
flags.DEFINE_string('gallery', None, 'a folder of images to search', flag_values=FLAGS)
flags.DEFINE_integer('topk', 10, 'matches listed per query', lower_bound=1, flag_values=FLAGS)
flags.DEFINE_string(
    'out',
    '',
    'write the retrieval picture to this PNG file, folders created (default: none; nothing is '
    'written to the current directory unasked)',
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    'max_rows',
    20,
    'queries shown in the picture (the first ones); all are printed',
    lower_bound=1,
    flag_values=FLAGS,
)
inference_flags.define(FLAGS, exported='paths / ids (.json) and ranking.json')


def main(argv: Sequence[str] | None = None) -> int:
  """`jaxreid-search`; argv without the program name (None: the process's). Exit status."""
  return common.run(_search, FLAGS, argv, doc=__doc__, required=('model', 'query', 'gallery'))


def _search() -> int:
  if FLAGS.out:
    common.output_path(FLAGS.out)  # before the work
  loaded = inference.load_model(FLAGS.model, inference_flags.model_overrides(FLAGS))
  print(f'model: {loaded.weights_path}\n  {loaded.describe()}', flush=True)
  t0 = time.time()
  result = search.search(
      loaded, FLAGS.query, FLAGS.gallery, topk=FLAGS.topk, batch_size=FLAGS.batch_size
  )
  sys.stdout.flush()
  for path, reason in result.skipped:
    print(f'warning: skipped unreadable file {path}: {reason}', file=sys.stderr, flush=True)
  print(
      f'{len(result.query)} query and {len(result.gallery)} gallery images, features in '
      f'{time.time() - t0:.1f}s\n'
  )
  print(search.ranking_text(result))
  match = result.is_match
  if match is None:
    print(
        '\nnote: not all file names follow the Market-1501 convention <pid>_c<camera>... '
        '(e.g. 0002_c1s1_000451_03.jpg), so true / false matches are not marked (grey frames)'
    )
  written = []
  if FLAGS.out:
    rows = min(FLAGS.max_rows, len(result.query))
    retrieval_figure.retrieval_figure(
        result.query.images[:rows],
        result.gallery.images,
        result.ranked[:rows],
        None if match is None else match[:rows],
        FLAGS.out,
        distances=result.distances[:rows],
        query_titles=[os.path.basename(p) for p in result.query.paths[:rows]],
    )
    legend = (
        'green = same identity, red = different'
        if match is not None
        else 'grey frames: identities unknown'
    )
    more = f', first {rows} of {len(result.query)} queries' if rows < len(result.query) else ''
    written.append(f'{FLAGS.out} ({legend}{more})')
  if FLAGS.export_features:
    written += search.export(result, FLAGS.export_features, loaded.weights_path)
  if written:
    print('\nwrote ' + '\n      '.join(written))
  if not FLAGS.out:
    print('\n(add --out=retrieval.png for a picture of the ranked matches)')
  k = result.ranked.shape[1]
  print(
      f'\nsummary: {len(result.query)} queries, {len(result.gallery)} gallery images, top {k} '
      f'each; {len(result.skipped)} unreadable file(s) skipped'
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
