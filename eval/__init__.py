"""Evaluation of kvjax: the paper's benchmarks (``eval.benchmarks``), task scorers (``eval.metrics``), fidelity to full
attention (``eval.fidelity``: teacher-forced KL, top-1 agreement, first divergence, attention recall), the resumable
grid runner behind ``kvjax eval`` (``eval.runner``) and its tables and plots (``eval.summary``)."""
