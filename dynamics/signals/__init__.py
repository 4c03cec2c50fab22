"""Training signals from per-example gradients: the numerical core behind :func:`dynamics.probe`.

One concern per module, the math in each docstring:

* :mod:`.losses`      per-example losses ``l_i`` and task weights (transformers' token weighting);
* :mod:`.capture`     forward hooks, the backward pass, and the check of which path covers a parameter;
* :mod:`.example_axis` checks that dimension 0 of a captured tensor indexes the examples;
* :mod:`.axis_cache`  reuse of those verdicts across probes of the same model and batch;
* :mod:`.products`    Linear / Embedding / Conv blocks of ``K``: ghost products or materialised gradients;
* :mod:`.layer_rules` closed-form per-example gradients of normalisation layers;
* :mod:`.module_grads` per-example gradients of any other module by a module-local vjp;
* :mod:`.gram_exact`  exact per-example autograd (fallback and reference);
* :mod:`.gram`        ``K = G G^T`` assembled from all of the above;
* :mod:`.geometry`    task Gram ``W K W^T``: norms, cosines, conflict rate;
* :mod:`.spectrum`    empirical Fisher spectrum from ``K / n``: SE, rho, effective rank;
* :mod:`.noise_scale` gradient noise scale ``B_simple``;
* :mod:`.hessian`     top Hessian eigenvalue by Lanczos on Hessian-vector products.

Only torch is imported here (numpy nowhere, transformers never).
"""
