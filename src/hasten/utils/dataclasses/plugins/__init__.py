"""Plugins: one module per engine they configure (re-exported by ``hasten.utils.dataclasses``)."""
