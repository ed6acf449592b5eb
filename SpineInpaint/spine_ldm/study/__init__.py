"""Blinded reader study (paper Table 2): "Realistic?" and "<condition> present?" per case.

Organizer workflow::

    spine-ldm study create --inpainted 'outputs/*.nrrd' --real-manifest real.csv \\
        --mix inpainted=40,real_pathological=5,real_healthy=5 --seed 0 --fov fsu --out study/
    spine-ldm study add-reader study/ "Dr A"          # prints the token once (only its sha256 is stored)
    spine-ldm study serve study/ --port 8765          # browser app (needs: cd spine_ldm/study/web && npm ci)
    spine-ldm study report study/ --out report/       # Table 2 CSV/Markdown/PNG, Cohen's / Fleiss' kappa
    spine-ldm study export study/ --out answers.jsonl # or .csv, --history for every row

Readers use the browser app or the Slicer "SpineInpaint Rating" module (same answer store, same keys:
Y/N realistic, P/A pathology present/absent, 1-5 confidence, Enter save & next).

Modules: ``engine`` (study files, creation, reader sessions), ``store`` (append-only sqlite answers),
``blind`` (anonymous ids, metadata-free volumes, public fields), ``report`` (Table 2, agreement, export),
``web`` (FastAPI app), ``cli`` (argparse). No slicer / qt / torch imports.
"""
