"""torch.library registration of the fused ops (``torch.ops.vae_fast.*``) and their autograd.

Each family lives in one module: ``latent`` (sampling + KL), ``likelihood``
(reconstruction terms) and ``dmol`` (discretised logistic mixtures). The ops are defined with ``torch.library.Library`` and
given fake (meta) kernels, so ``torch.compile(fullgraph=True)`` traces through
them; the public functions wrap them in a thin ``autograd.Function`` (about half
the per-call overhead of ``torch.library.custom_op`` at small shapes, see
benchmarks/bench_dispatch.py). The same backward is also registered on the ops
themselves, so ``torch.ops.vae_fast.*`` is differentiable and ``opcheck``-clean, except each op's
``<op>_traced`` twin: the same kernels and fake kernel without autograd, which torch.compile records in its graphs
(the traced ``autograd.Function`` is the autograd there; see ``_library.call``).
"""
from . import dmol, head, latent, likelihood  # noqa: F401  (registers the ops)
