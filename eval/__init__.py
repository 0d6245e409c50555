"""Evaluation of kvjax: the paper's benchmarks (``eval.benchmarks``), task scorers (``eval.metrics``), fidelity to full
attention (``eval.fidelity``: teacher-forced KL, top-1 agreement, first divergence, attention recall), and the
resumable grid behind ``kvjax eval``: its command line (``eval.cli``), presets (``eval.presets``), method grid
(``eval.grid``), run loop (``eval.runner``), result store (``eval.store``), statistics (``eval.stats``) and tables and
plots (``eval.summary``, ``eval.compare``)."""
