"""Making the reference model: training it (``python -m moaplan.training.train``), measuring it
(``python -m moaplan.training.report``) and rendering its card.

Scripts above everything else (they use the evaluation and the runtime); no command imports
them, so the loader in :mod:`moaplan.model` that every command uses stays at the bottom.
"""
