"""The model side of a run: building it from the spec, and the layers that keep its math independent of
how a global batch is split over workers.

- ``builders``: ``build_model`` (mlp / cnn / a factory), ``build_optimizer``, ``load_init_weights``,
  ``num_outputs``, ``zero_masks`` (``model.keep_zeros``);
- ``batchnorm``: ``GlobalBatchNorm``, BatchNorm whose statistics are those of the global batch;
- ``dropout``: ``KeyedDropout``, dropout whose masks are keyed by sample, not by worker.
"""
