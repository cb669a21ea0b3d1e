"""Maths on a map ``f``: the floor every model and recipe stands on.

* ``implicit``: :func:`fixed_point`, a differentiable fixed point of ``f``;
* ``backward``: its backward modes (IFT, phantom, truncated, unroll) as objects;
* ``stars``: the STARS penalty (Jacobian spectral-radius regularisation) and spectral
  radius estimates;
* ``compiling``: the one place eqloop calls ``torch.compile``;
* ``defaults``: solver budgets and tolerances shared by evaluation and training.

Nothing here knows about language models. Import the modules themselves.
"""
