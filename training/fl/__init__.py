"""FedLens federated-learning engine: plain Python and PyTorch, no Django.

Submodules: ``networks``, ``data``, ``local``, ``metrics``, ``weights``, ``strategies``
and ``simulation``; import from them directly.
"""
