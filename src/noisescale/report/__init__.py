"""Reports and pages: numbers first (``data``), then figures (``figures``) and HTML (``html``).

- :mod:`noisescale.report.numbers`: how numbers are written, identically in Python and in the
  pages' JavaScript.
- :mod:`noisescale.report.data`: reads a run history (JSON Lines) and returns the numbers each
  figure of the run report shows — tests check these, not pixels.
- :mod:`noisescale.report.figures`: matplotlib (Agg) PNGs drawn from those numbers.
- :mod:`noisescale.report.html`: the self-contained run-report page.
- :mod:`noisescale.report.explore`: the self-contained interactive explorer page.

Nothing here is imported by the core; matplotlib is imported only when a figure is drawn.
"""
