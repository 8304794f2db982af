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

Every tool is also `python -m jaxreid.tools.<name>`, prints its usage with `--help` and reports a
bad command line or a user error as one line `error: ...` (exit status 2). `common.py` holds what
they share: the runner and the model flags. The library modules parse no flags.
"""
