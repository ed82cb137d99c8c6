"""What a run changed and bought, rendered: the report (table and JSON from one object), pruned filters and
why each kept one stays, and the sparsity no channel removal can take. What is measured comes from
:mod:`compactor.measure`."""
