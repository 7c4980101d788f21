"""The application layer: configs, kinds of run, training, sampling, reports and the CLI.

A run flows one way: ``cli`` -> ``config`` (validated) -> ``kinds`` (the run-kind table) ->
``runs.build`` -> ``training`` or ``sampling`` -> ``report`` / ``evaluate``. The library below
(``difflab.schedules``, ``samplers``, ...) takes keyword arguments and never reads a config.
"""
