"""The command-line tools: thin front ends on absl flags over the library modules.

  tool                  console script          also                          library
  train.py              jaxreid-train           python -m jaxreid.main        jaxreid.run
  evaluate.py           jaxreid-evaluate        python -m jaxreid.evaluate    jaxreid.evaluate
  search.py             jaxreid-search          python -m jaxreid.search      jaxreid.search
  convert.py            jaxreid-convert         python -m jaxreid.convert     jaxreid.convert
  export.py             jaxreid-export          python -m jaxreid.export      jaxreid.export
  plots.py              jaxreid-plots           python -m jaxreid.plots       jaxreid.plots
  benchmark.py          jaxreid-benchmark       python -m jaxreid.benchmark   jaxreid.benchmark
  model_report.py       jaxreid-model-report                                  jaxreid.flops

Every tool is also `python -m jaxreid.tools.<name>` and follows one convention (`common.py`, which
holds the runner and the model flags): flag names with underscores; `--model` is what a tool
reads (evaluate, search, export, convert) and `--out` the file it writes as its result (convert,
export, search's picture, benchmark's JSON; parent folders are created), `--export_features=DIR`
the features folder (evaluate, search); `--help` prints the docstring of the module defining the
flags, then the flags; a bad command line or bad input is one line `error: ...` on stderr with
exit status 2, and `--verbose` shows the traceback instead. The library modules parse no flags.
"""
