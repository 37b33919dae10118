"""Privacy pieces, each usable on its own (like optax transformations):

* :mod:`sfljax.privacy.dpsgd` -- per-example clipping and Gaussian noise on
  the sum (client-side DP-SGD, Abadi et al. 2016);
* :mod:`sfljax.privacy.sampling` -- Poisson-sampled batch schedules in
  fixed-shape masked buffers;
* :mod:`sfljax.privacy.accounting` -- (epsilon, delta) of the client-side
  updates with ``dp-accounting`` (RDP or PLD), per client, and noise
  calibration;
* :mod:`sfljax.privacy.pixeldp` -- the PixelDP noise layer (Lecuyer et al.
  2019) and the weight projection that bounds its sensitivity.
"""
