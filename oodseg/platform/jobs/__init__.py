"""The jobs' command lines (``jobs/*.py`` and ``python -m oodseg <command>`` call these ``main`` functions)."""
