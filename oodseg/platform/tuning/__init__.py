"""Ray Tune searches (one declared space per scorer / loss, next to its code, is what Tune searches):

* :mod:`.temperature` — a scorer's temperature on the benchmark's cached outputs (Optuna TPE or a grid; no forward
  pass per trial);
* :mod:`.loss` — loss hyper-parameters with ASHA, each trial a Ray Train fine-tuning run;
* :mod:`.spaces` (declared space → Tune domains), :mod:`.trials` (the ``trials`` table, best-trial query),
  :mod:`.reaper` (placement groups of stopped Train trials).
"""
