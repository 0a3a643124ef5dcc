"""The training state behind ``Accelerator.save_state`` / ``load_state`` (public path:
:mod:`hasten.checkpointing`).

``files`` names and reads the files (Accelerate's names), ``rng`` captures and restores every
random stream, ``folders`` makes a checkpoint appear whole or not at all (automatic naming,
``total_limit``), ``training_state`` writes and reads a whole checkpoint, and ``methods`` is what
the ``Accelerator`` delegates to.
"""
