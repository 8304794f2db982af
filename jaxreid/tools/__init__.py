"""The command-line tools: thin front ends on absl flags over the library modules.

  tool                  console script          library
  train.py              jaxreid-train           jaxreid.run (also python -m jaxreid.main)
  evaluate.py           jaxreid-evaluate        jaxreid.evaluator
  search.py             jaxreid-search          jaxreid.search
  convert.py            jaxreid-convert         jaxreid.convert
  export.py             jaxreid-export          jaxreid.export
  plots.py              jaxreid-plots           jaxreid.plots
  benchmark.py          jaxreid-benchmark       jaxreid.benchmark
  model_report.py       jaxreid-model-report    jaxreid.flops

Every tool is also `python -m jaxreid.tools.<name>` and follows one convention (`common.py`, the
runner; `inference_flags.py`, the model flags): flag names with underscores; `--model` is what a
tool reads (evaluate, search, export, convert) and `--out` the file it writes as its result
(convert, export, search's picture, benchmark's JSON; parent folders are created),
`--export_features=DIR` the features folder (evaluate, search); `--help` prints the docstring of the
module defining the flags, then the flags; a bad command line or bad input is one line `error: ...`
on stderr with exit status 2, and `--verbose` shows the traceback instead. The library modules parse
no flags.
"""
