"""What the server can learn from the cut, measured, and a defence.

* :mod:`sfljax.leakage.measures` -- distance correlation (NoPeek's measure),
  MSE, PSNR and SSIM;
* :mod:`sfljax.leakage.inversion` -- model inversion: a decoder the server
  trains from smashed data back to inputs, and a PNG grid of the results;
* :mod:`sfljax.leakage.label_inference` -- label inference from per-example
  cut gradients (norm and direction scoring, Li et al. 2021), as AUCs;
* :mod:`sfljax.leakage.nopeek` -- NoPeek's distance-correlation penalty on
  the client's loss (``SplitFed(smashed_penalty=NoPeek(w))``);
* :mod:`sfljax.leakage.probe` -- all measures on a run's model, per round
  (``sfljax train --leakage``).
"""

from sfljax.leakage.nopeek import NoPeek

__all__ = ["NoPeek"]
