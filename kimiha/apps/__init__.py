"""The runnable applications: ``cli`` (``python -m kimiha``), ``demo`` (the main job: the recorded tape through
the whole pipeline on one bus) and ``distributed`` (the same components as three processes over NATS).

They may import every other room; nothing imports them but ``kimiha/__main__.py``.
"""
