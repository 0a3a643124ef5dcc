"""The private pieces behind :class:`hasten.accelerator.Accelerator` (layer 7).

- :mod:`hasten.engines.connector` resolves the constructor's arguments once into a frozen
  :class:`~hasten.engines.connector.Settings` and picks one engine and one precision;
- :mod:`hasten.engines.base` is the engine interface (its docstring is the contract);
- :mod:`hasten.engines.plugins` resolves the FSDP and DeepSpeed plugins (arguments, launcher
  variables, the live state) for it;
- the engines: :mod:`hasten.engines.single`, :mod:`hasten.engines.ddp`, :mod:`hasten.engines.fsdp2`
  and :mod:`hasten.engines.deepspeed` (its config filled by :mod:`hasten.engines.deepspeed_setup`);
- :mod:`hasten.engines.precision` is mixed precision (autocast, the gradient scaler);
- :mod:`hasten.engines.accumulation` is the ``accumulate`` context;
- :mod:`hasten.engines.outputs` gathers for metrics and writes models to disk;
- :mod:`hasten.engines.processes` is the facade's process layout, collectives and helpers (a mixin).

Nothing here is public: import the ``Accelerator`` from :mod:`hasten.accelerator`.
"""
