"""Paired-truth phantom benchmark (issue #12): ``python -m model_training benchmark-phantoms`` and
``python -m model_training train-reader``.

One home per concept:

* :mod:`.cases`: healthy phantom H + pathological twin P per seed, level drawn per seed;
* :mod:`.seeds`: seed lists, the training seeds a registry entry records, the overlap refusal;
* :mod:`.metrics`: per-output metrics against the truth (cos, R^2, sharpness, protrusion volume, canal area);
* :mod:`.stats`: bootstrap / Wilson intervals, AUC, FID, KID;
* :mod:`.readers`: the pathology-present CNN reader and the C2ST realism reader;
* :mod:`.run`: the benchmark command (cases over worker processes, resumable);
* :mod:`.report`: results.csv, table1.md, table2.md, summary.json;
* :mod:`.figures`: the per-condition grids, the summary bar chart, the sigma-sweep plot.
"""
